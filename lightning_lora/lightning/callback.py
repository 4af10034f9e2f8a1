"""LoRACallback: LoRA / QLoRA for any LightningModule, added with one line to the Trainer."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_lora._io import require_directory_path, require_path_argument
from lightning_lora.config import BiasMode, InitMode, LoRAConfig, init_changes_base, quantization_from_options
from lightning_lora.lightning.controller import LoRAController, serving_options


def _as_dict(pattern_map: Any) -> Any:
    """A mapping as a dict (LightningCLI gives its own mapping types), None as {}; anything else as given, for
    ``LoRAConfig`` to refuse with its message."""
    if pattern_map is None:
        return {}
    return dict(pattern_map) if isinstance(pattern_map, Mapping) else pattern_map


def _refuse_dropped_by_from_backbone(given: dict[str, Any]) -> None:
    """With ``from_backbone=True`` the LoRA and quantization configs come from the backbone: refuse any of those
    arguments set away from its default, which would otherwise be dropped without a word."""
    defaults = inspect.signature(LoRACallback.__init__).parameters
    changed = [name for name, value in given.items() if not _same(value, defaults[name].default)]
    if changed:
        shown = ", ".join(f"`{name}`={given[name]!r}" for name in changed)
        raise ValueError(
            f"{shown} {'is' if len(changed) == 1 else 'are'} not used with `from_backbone`=True: the LoRA and quantization "
            "configs come from the backbone (build_lora_model). Drop them, or set from_backbone=False to have the backbone "
            "checked against them."
        )


def _same(value: Any, default: Any) -> bool:
    """``value`` means what ``default`` means (an empty mapping or list where the default is None: nothing)."""
    if default is None and isinstance(value, (Mapping, list, tuple)) and len(value) == 0:
        return True
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001 - a value that cannot be compared (a tensor of ids) is not the default
        return False


class LoRACallback(Callback):
    """Inject LoRA (optionally on a 4-bit or 8-bit backbone), keep checkpoints adapter-only, export the adapter.

    Injection happens in ``setup``, or right after ``configure_model`` when the backbone is built
    there, so it always precedes the strategy's wrapping and ``configure_optimizers``. To make that
    possible the callback wraps three hooks of the module instance: ``configure_model`` (inject after
    it), ``on_load_checkpoint`` (check the checkpoint's backbone and LoRA config before any weight
    loads) and, under FSDP, ``configure_gradient_clipping`` (norm clipping that does not raise).

    Example::

        trainer = L.Trainer(callbacks=[LoRACallback(r=8, target_modules=["q_proj", "v_proj"], quantize="nf4", backbone="model")])
        trainer.fit(module)  # module.configure_optimizers uses [p for p in self.parameters() if p.requires_grad]
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: list[str] | str = "all-linear",
        exclude_modules: list[str] | str | None = None,
        bias: BiasMode = "none",
        modules_to_save: list[str] | None = None,
        use_rslora: bool = False,
        init: InitMode = "kaiming",
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        target_parameters: list[str] | None = None,
        trainable_token_indices: list[int] | dict[str, list[int]] | None = None,
        lora_plus_ratio: float | None = None,
        use_dora: bool = False,
        adapter_name: str = "default",
        quantize: Literal["nf4", "fp4", "int8"] | None = None,
        double_quant: bool = True,
        compute_dtype: str | None = None,
        quant_storage: str = "uint8",
        backbone: str | None = None,
        adapter_only_checkpoint: bool = True,
        export_dir: str | None = None,
        merge_on_export: bool = False,
        convert_init_on_export: bool = False,
        skip_nonfinite: bool = True,
        max_nonfinite_steps: int = 10,
        compile_blocks: bool | list[str] = False,
        chunked_ce: int = 0,
        from_backbone: bool = False,
        serving_targets: list[str] | None = None,
        strict_serving: bool = False,
        vllm_max_lora_rank: int = 16,
    ) -> None:
        """
        Args:
            r: Rank of the LoRA update.
            alpha: LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).
            dropout: Dropout on the LoRA input, in [0, 1).
            target_modules: Module names (path suffixes), one regex over the full path, or 'all-linear'.
            exclude_modules: Modules never adapted, in the same forms as target_modules.
            bias: Which biases train and are saved: 'none', 'all' or 'lora_only'.
            modules_to_save: Modules trained in full and saved with the adapter (e.g. ['classifier']).
            use_rslora: Scale by alpha / sqrt(r) (rank-stabilized LoRA).
            init: Init of A and B: 'kaiming' or 'gaussian' (B at zero), or from the base weight, which keeps the
                residual: 'pissa', 'pissa_niter_K' (randomized SVD, K iterations) or 'olora'.
            rank_pattern: Per-module rank overrides: regex -> r.
            alpha_pattern: Per-module alpha overrides: regex -> alpha.
            target_parameters: Parameters to adapt as `module.param` suffixes, e.g. ['experts.gate_up_proj',
                'experts.down_proj'] for fused MoE experts; with target_modules=None, only those.
            trainable_token_indices: Embedding rows to train (e.g. new tokens): token ids of the input embedding, or
                {module suffix: ids}.
            lora_plus_ratio: LoRA+: B matrices (and 1-D tensors) train at this multiple of each optimizer group's lr,
                e.g. 16; the groups of the optimizer built in configure_optimizers are split as it is built.
            use_dora: DoRA: a trained magnitude per output row rescales the adapted weight.
            adapter_name: Name of the adapter this callback injects (or adds, if the backbone has adapters already)
                and trains; the backbone's other adapters stay frozen. Non-default names export to a subfolder.
            quantize: Quantize the frozen backbone with bitsandbytes: 'nf4', 'fp4', 'int8' (lowercase), or None.
            double_quant: Also quantize the 4-bit block scales. This and the next two options are for 'nf4' / 'fp4':
                left at their defaults otherwise (int8 or None ignores them, so another value is refused).
            compute_dtype: Matmul dtype of 4-bit layers ('bfloat16', 'float16', 'float32'); default bf16 on GPU, fp32 on CPU.
            quant_storage: Storage dtype of packed 4-bit weights; 'bfloat16' for FSDPStrategy.
            backbone: Attribute of the LightningModule holding the model to adapt (e.g. 'model'); None = the whole module.
            adapter_only_checkpoint: Checkpoints hold the adapter, not the frozen backbone.
            export_dir: When fit ends, write the PEFT-format adapter to export_dir/adapter.
            merge_on_export: Also write merged full weights to export_dir/merged.
            convert_init_on_export: With init 'pissa' / 'pissa_niter_K' / 'olora', also write export_dir/adapter_converted:
                the adapter as plain LoRA (rank 2r) that applies to the original base weights.
            skip_nonfinite: Skip optimizer steps whose gradients hold NaN/Inf, with a warning.
            max_nonfinite_steps: Stop with an error after this many skipped steps in a row.
            compile_blocks: torch.compile each decoder layer after injection (regional compilation): True for
                transformers models (their ``_no_split_modules``), or a list of block class names.
            chunked_ce: If > 0, a transformers causal LM in the backbone computes its loss (when called with `labels`
                during training) over chunks of this many tokens and never forms the full logits (`output.logits` is
                then None; validation and generation return them as usual). 1024 to 8192 is typical.
            from_backbone: The backbone comes with LoRA in it (``lightning_lora.sharded_loading.build_lora_model``): take
                its LoRA and quantization configs, so they are written once; the LoRA and quantization arguments above
                must then stay at their defaults (another value is refused). Without it, a backbone that comes with LoRA
                must have been built with this callback's config.
            serving_targets: Before the export writes, say which of 'vllm', 'llama.cpp' will refuse or mis-scale the adapter.
            strict_serving: Make such a finding an error (nothing is written).
            vllm_max_lora_rank: The --max-lora-rank the vLLM server runs with (vLLM's default 16).
        """
        super().__init__()
        lora_config = LoRAConfig(
            r=r,
            alpha=alpha,
            dropout=dropout,
            target_modules=target_modules,
            exclude_modules=exclude_modules,
            bias=bias,
            modules_to_save=modules_to_save,
            init=init,
            use_rslora=use_rslora,
            rank_pattern=_as_dict(rank_pattern),
            alpha_pattern=_as_dict(alpha_pattern),
            target_parameters=target_parameters,
            trainable_token_indices=trainable_token_indices,
            use_dora=use_dora,
        )
        if not isinstance(from_backbone, bool):
            raise TypeError(
                f"`from_backbone` must be True or False, got {from_backbone!r}: a truthy string or number would drop the "
                "LoRA settings given here and take the adapter from the backbone."
            )
        if not isinstance(convert_init_on_export, bool):
            raise TypeError(f"`convert_init_on_export` must be True or False, got {convert_init_on_export!r}.")
        if convert_init_on_export and (from_backbone or not init_changes_base(lora_config.init)):
            raise ValueError(
                f"`convert_init_on_export`=True converts PiSSA / OLoRA adapters to plain LoRA, but `init`={init!r} leaves the "
                "base untouched: its adapter applies to the original base as it is (build_lora_model, which from_backbone "
                "takes the adapter from, makes no PiSSA / OLoRA adapters). Drop convert_init_on_export, or use "
                "init='pissa' / 'olora'."
            )
        # Checked (under the names given here) even when from_backbone then drops it, as the LoRA config above is.
        quantization = quantization_from_options(quantize, double_quant, compute_dtype, quant_storage)
        if from_backbone:
            _refuse_dropped_by_from_backbone(dict(
                r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, exclude_modules=exclude_modules, bias=bias,
                modules_to_save=modules_to_save, use_rslora=use_rslora, init=init, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                target_parameters=target_parameters, trainable_token_indices=trainable_token_indices, use_dora=use_dora,
                quantize=quantize, double_quant=double_quant, compute_dtype=compute_dtype, quant_storage=quant_storage,
            ))  # fmt: skip
            lora_config = quantization = None
        self.controller = LoRAController(
            lora_config, quantization, backbone, adapter_only_checkpoint, skip_nonfinite, max_nonfinite_steps, compile_blocks,
            lora_plus_ratio=lora_plus_ratio, adapter_name=adapter_name, chunked_ce=chunked_ce,
        )
        if export_dir is not None:
            require_path_argument(export_dir, "export_dir", none_allowed=True)
        if not isinstance(merge_on_export, bool):
            raise TypeError(f"`merge_on_export` must be True or False, got {merge_on_export!r}.")
        self.serving_options = serving_options(serving_targets, strict_serving, vllm_max_lora_rank)
        self.export_dir = export_dir
        self.merge_on_export = merge_on_export
        self.convert_init_on_export = convert_init_on_export

    @property
    def lora_config(self) -> LoRAConfig | None:
        """The LoRA config; with ``from_backbone``, None until the backbone is built."""
        return self.controller.lora_config

    @property
    def state_key(self) -> str:
        name = self.controller.adapter_name
        # Unchanged for the default adapter, so checkpoints of single-adapter runs keep their callback state.
        return f"LoRACallback{{backbone={self.controller.backbone!r}}}" if name == "default" else f"LoRACallback{{backbone={self.controller.backbone!r}, adapter={name!r}}}"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.export_dir is not None and stage == "fit":
            require_directory_path(self.export_dir, "export_dir")  # before training, not after the last step
        self.controller.setup(trainer, pl_module, check_checkpoints=True)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.controller.require_injected(pl_module)
        self.controller.check_optimizers(trainer, pl_module)
        self.controller.log_summary(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.controller.warn_if_eval_mode(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.controller.require_injected(pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.controller.filter_checkpoint(checkpoint, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        self.controller.handle_nonfinite_gradients(trainer, pl_module, optimizer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir is not None:
            self.controller.export(trainer, pl_module, self.export_dir, self.merge_on_export, self.serving_options, self.convert_init_on_export)

    def state_dict(self) -> dict[str, Any]:
        # RNG states make dropout masks after a resume the same as in an uninterrupted run.
        state = {"skipped_steps": self.controller.skipped_steps, "cpu_rng_state": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng_state"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.controller.skipped_steps = state_dict.get("skipped_steps", 0)
        if "cpu_rng_state" in state_dict:
            torch.set_rng_state(state_dict["cpu_rng_state"])
        if "cuda_rng_state" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda_rng_state"])
