"""Multi-GPU smoke run (NCCL): 2 processes x batch 2 must train like 1 process x batch 4, and
evaluation must gather every prediction once, in dataset order.

    torchrun --nproc_per_node 2 benchmarks/ddp_smoke.py --out /tmp/ddp   # then:
    python benchmarks/ddp_smoke.py --out /tmp/single --single --compare /tmp/ddp
"""

import argparse
import json

import torch

from llava_loop import Loop, LoopConfig
from llava_loop.testing import synthetic_vqa, tiny_llava


class SGDLoop(Loop):
    """SGD: its update scales with the gradient, so a wrong loss normalisation shows."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--compare", default=None)
    args = parser.parse_args()
    model, processor = tiny_llava(seed=0)
    config = LoopConfig(
        output_dir=args.out,
        max_steps=3,
        batch_size=4 if args.single else 2,
        shuffle=False,
        lora_dropout=0.0,
        precision="fp32",
        max_grad_norm=0.0,
        log_steps=1,
        eval_batch_size=3,
        max_new_tokens=4,
        handle_signals=False,
    )
    loop = SGDLoop(model, processor, config)
    loop.fit(synthetic_vqa(24, seed=3), synthetic_vqa(7, seed=4))  # 7 eval samples: uneven shards
    if not loop.accelerator.is_main_process:
        return
    weights = {
        n: p.detach().float().cpu()
        for n, p in loop.accelerator.unwrap_model(loop.model).named_parameters()
        if p.requires_grad
    }
    torch.save(weights, f"{args.out}/weights.pt")
    ids = [json.loads(line)["id"] for line in open(f"{args.out}/predictions/step_000003.jsonl")]
    print(
        json.dumps(
            {
                "processes": loop.accelerator.num_processes,
                "device": str(loop.accelerator.device),
                "prediction_ids": ids,
                "history": loop.state.history[-1],
            }
        )
    )
    if args.compare:
        other = torch.load(f"{args.compare}/weights.pt")
        diff = max((other[n] - w).abs().max().item() for n, w in weights.items())
        other_ids = [json.loads(line)["id"] for line in open(f"{args.compare}/predictions/step_000003.jsonl")]
        print(
            json.dumps(
                {
                    "max_weight_diff_vs_ddp": diff,
                    "same_prediction_ids": ids == other_ids,
                    "ids_unique": len(set(other_ids)) == len(other_ids) == 7,
                }
            )
        )


if __name__ == "__main__":
    main()
