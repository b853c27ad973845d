"""The anchor of `pipeline bench collect`: transformers' GPT-Neo forward
(no lm_head) on the shape the benchmark collects with, on the CPU.

    python pipeline/python/bench/hf_forward.py [--depth 2] [--width 128] [--threads 2]

A randomly initialised GPTNeoModel of the project's grid shape (16 heads,
global and local layers alternating, window 256, 4x MLP), batch 2 of
T = 2048 tokens, under `torch.inference_mode`; prints tokens per second over
five forwards after a warm-up. Needs torch and transformers.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import GPTNeoConfig, GPTNeoModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=50257,
        hidden_size=args.width,
        num_layers=args.depth,
        num_heads=16,
        attention_types=[[["global", "local"], (args.depth + 1) // 2]],
        window_size=256,
        max_position_embeddings=2048,
        intermediate_size=4 * args.width,
    )
    config.attention_layers = config.attention_layers[: args.depth]
    model = GPTNeoModel(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 2048))
    with torch.inference_mode():
        model(tokens)
        reps = 5
        started = time.perf_counter()
        for _ in range(reps):
            model(tokens)
        seconds = (time.perf_counter() - started) / reps
    print(
        f"transformers {args.depth}x{args.width}, T = 2048, batch 2: {tokens.numel() / seconds:.0f} tokens/s "
        f"(torch {torch.__version__}, {args.threads} threads, attention {config._attn_implementation})"
    )


if __name__ == "__main__":
    main()
