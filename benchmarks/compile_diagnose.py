"""Graph breaks and recompiles of one compiled decoder block with our LoRA layers (``torch._dynamo.explain``).

    TORCH_LOGS=graph_breaks,recompiles python benchmarks/compile_diagnose.py [--nf4-kernel 0|1]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nf4-kernel", type=int, default=1)
    parser.add_argument("--rows", type=int, default=2048)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_lora import LoRAConfig, QuantizationConfig, inject_lora, nf4_kernel

    nf4_kernel.ENABLED = bool(args.nf4_kernel)
    nf4_kernel.prepare()
    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                         vocab_size=1024, max_position_embeddings=4096)  # fmt: skip
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.use_cache = False
    model = inject_lora(model, LoRAConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
                        QuantizationConfig(mode="nf4", compute_dtype="bfloat16"))  # fmt: skip
    ids = torch.randint(0, 1024, (1, args.rows), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()  # eager once: compute dtypes set
        block = model.model.layers[0]
        hidden = model.model.embed_tokens(ids).detach().requires_grad_()
        position_ids = torch.arange(args.rows, device="cuda")[None]
        emb = model.model.rotary_emb(hidden, position_ids)
        explanation = torch._dynamo.explain(block)(hidden, position_embeddings=emb, attention_mask=None, position_ids=position_ids)
    print("graphs", explanation.graph_count, "breaks", explanation.graph_break_count)
    for reason in explanation.break_reasons:
        print("BREAK:", reason.reason[:1500])
        for frame in (reason.user_stack or [])[-6:]:
            print("   ", frame.filename, frame.lineno, frame.name, frame.line)


if __name__ == "__main__":
    main()
