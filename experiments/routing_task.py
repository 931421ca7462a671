"""Does a Gaze Attention model learn to look where the answer is?

A synthetic visual question answering task whose answer depends on one region of the
image: an image of 4x4 regions (2x2 tokens each) holds four objects, each filling a
region and with its own shape and colour (the visual features encode both, plus noise);
the question "what colour is the <shape>?" must be answered with the colour of the
object of that shape. A small GazeLM (2 layers, d=64, 4 heads over 2 KV heads, one
selection per KV head) is trained from scratch on the CPU with the next-token loss on
the answer, in three runs with the same data and steps:

- dense: every query attends to every region;
- progressive: Gaze Attention, dense at first, then K lowered to 2 of 16 regions (cosine);
- fixed: Gaze Attention with K = 2 from the first step.

Reported: answer accuracy on held-out images (the gaze runs evaluated at K = 2), and
routing accuracy: how often the regions the question token selects (per layer and KV
head) include the object asked about, against the random-routing baseline K/R = 12.5%.

    python -m experiments.routing_task            # full run, ~minutes on 2 cores
    python -m experiments.routing_task --steps 40 --out /tmp/quick   # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from gaze_ext.model import GazeLM
from gaze_ext.schedule import TopKSchedule

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


@dataclass
class TaskConfig:
    grid: int = 4           # regions per side
    region: int = 2         # tokens per region side
    objects: int = 4
    shapes: int = 6
    colours: int = 6
    noise: float = 0.25
    feature_dim: int = 16

    @property
    def num_regions(self) -> int:
        return self.grid * self.grid

    @property
    def vocab(self) -> int:  # BOS, QUESTION, shapes, colours
        return 2 + self.shapes + self.colours


BOS, QUESTION = 0, 1


def make_batch(cfg: TaskConfig, batch: int, gen: torch.Generator):
    """Images [B, H, W, F], questions [B, 3] (BOS, QUESTION, shape token), answers [B]
    (colour token) and the region of the object asked about [B]."""
    side = cfg.grid * cfg.region
    regions = torch.argsort(torch.rand(batch, cfg.num_regions, generator=gen), 1)[:, : cfg.objects]
    shapes = torch.argsort(torch.rand(batch, cfg.shapes, generator=gen), 1)[:, : cfg.objects]
    colours = torch.randint(0, cfg.colours, (batch, cfg.objects), generator=gen)
    features = torch.randn(batch, cfg.grid, cfg.grid, cfg.feature_dim, generator=gen) * cfg.noise
    code = torch.zeros(batch, cfg.objects, cfg.feature_dim)
    code.scatter_(2, shapes[..., None], 1.0)
    code.scatter_(2, (cfg.shapes + colours)[..., None], 1.0)
    flat = features.view(batch, cfg.num_regions, cfg.feature_dim)
    flat.scatter_add_(1, regions[..., None].expand(-1, -1, cfg.feature_dim), code)
    # each region's feature fills its r x r tokens, with token-level noise on top
    image = features.repeat_interleave(cfg.region, 1).repeat_interleave(cfg.region, 2)
    image = image + torch.randn(batch, side, side, cfg.feature_dim, generator=gen) * cfg.noise
    asked = torch.randint(0, cfg.objects, (batch,), generator=gen)
    pick = lambda t: t.gather(1, asked[:, None])[:, 0]  # noqa: E731
    questions = torch.stack([torch.full((batch,), BOS), torch.full((batch,), QUESTION),
                             2 + pick(shapes)], 1)
    answers = 2 + cfg.shapes + pick(colours)
    return image, questions, answers, pick(regions)


def samples_of(image, questions):
    """Sequences: BOS, the image (context tokens follow it), QUESTION, shape."""
    return [[q[:1], img, q[1:]] for img, q in zip(image, questions)]


def evaluate(model: GazeLM, cfg: TaskConfig, data, topk: Optional[int]) -> Dict[str, object]:
    image, questions, answers, target = data
    for layer in model.layers:
        layer.attn.record_selection = True
    with torch.no_grad():
        x, layout = model.embed_batch(samples_of(image, questions))
        logits = model(x, layout, topk)
        last = layout.lengths - 1
        accuracy = (logits[torch.arange(len(answers)), last].argmax(-1) == answers).float().mean()
        routing = []
        if topk is not None:
            for layer in model.layers:
                idx = layer.attn.last_selection[:, :, -1]   # the question token: last text row
                hit = (idx == target[:, None, None]).any(-1).float()  # [B, Hkv]
                routing.append(hit.mean().item())
    for layer in model.layers:
        layer.attn.record_selection = False
    return {"accuracy": accuracy.item(), "routing_per_layer": routing,
            "routing": max(routing) if routing else None}


def train(name: str, cfg: TaskConfig, schedule, steps: int, batch: int, eval_data, seed: int,
          eval_every: int, eval_topk: Optional[int]):
    torch.manual_seed(seed)
    model = GazeLM(cfg.vocab, cfg.feature_dim, d_model=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, mlp_hidden=128, num_context=4, region_shape=(1, cfg.region, cfg.region))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, steps // 20)
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159)).item())  # noqa: E731
    gen = torch.Generator().manual_seed(seed + 1)  # the same data stream for every run
    history = []
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * lr_at(step)
        image, questions, answers, _ = make_batch(cfg, batch, gen)
        x, layout = model.embed_batch(samples_of(image, questions))
        logits = model(x, layout, schedule(step))
        last = layout.lengths - 1
        loss = F.cross_entropy(logits[torch.arange(batch), last], answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            k_now = schedule(step)
            # routing is measured at the target K (eval_topk) even while training dense
            current = evaluate(model, cfg, eval_data, k_now)
            at_target = evaluate(model, cfg, eval_data, eval_topk or 2)
            history.append({"step": step + 1, "loss": loss.item(), "train_k": k_now,
                            "accuracy": current["accuracy"],
                            "accuracy_at_target_k": at_target["accuracy"],
                            "routing": at_target["routing"],
                            "routing_per_layer": at_target["routing_per_layer"]})
            print(f"[{name}] step {step + 1:5d} loss {loss.item():.3f} K={k_now} "
                  f"acc {current['accuracy']:.3f} acc@K2 {at_target['accuracy']:.3f} "
                  f"routing@K2 {at_target['routing']:.3f} ({time.time() - start:.0f} s)", flush=True)
    final = evaluate(model, cfg, eval_data, eval_topk)
    final_routing = evaluate(model, cfg, eval_data, 2)
    return {"name": name, "history": history, "final_accuracy": final["accuracy"],
            "final_routing": final_routing["routing"],
            "final_routing_per_layer": final_routing["routing_per_layer"],
            "eval_topk": eval_topk, "seconds": time.time() - start}


def run(steps: int, batch: int, eval_size: int, seed: int, out: str, plot: bool = True):
    cfg = TaskConfig()
    R, K = cfg.num_regions, 2
    eval_data = make_batch(cfg, eval_size, torch.Generator().manual_seed(10_000 + seed))
    eval_every = max(1, steps // 20)
    dense_steps, decay_steps = int(0.2 * steps), int(0.4 * steps)
    runs = [
        train("dense", cfg, lambda s: None, steps, batch, eval_data, seed, eval_every, None),
        train("progressive", cfg, TopKSchedule(K, R, dense_steps, decay_steps, "cosine"), steps,
              batch, eval_data, seed, eval_every, K),
        train("fixed", cfg, TopKSchedule(K, R, kind="constant"), steps, batch, eval_data, seed,
              eval_every, K),
    ]
    result = {"task": asdict(cfg), "steps": steps, "batch": batch, "eval_size": eval_size,
              "topk": K, "random_routing": K / R, "runs": runs,
              "schedule": {"dense_steps": dense_steps, "decay_steps": decay_steps, "kind": "cosine"}}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "routing_task.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "routing_task.md"), "w") as f:
        f.write(report(result))
    if plot:
        save_plot(result, os.path.join(out, "routing_task.png"))
    print(report(result))
    return result


def report(result) -> str:
    runs = {r["name"]: r for r in result["runs"]}
    dense = runs["dense"]["final_accuracy"]
    lines = [
        "# Routing task: answer accuracy and routing accuracy",
        "",
        f"{result['steps']} steps of batch {result['batch']}, evaluated on {result['eval_size']} "
        f"held-out images; K = {result['topk']} of 16 regions; random routing = "
        f"{result['random_routing']:.1%}.",
        "",
        "| run | answer accuracy | vs dense | routing accuracy (best layer) | per layer | train time |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("dense", "progressive", "fixed"):
        r = runs[name]
        per_layer = ", ".join(f"{x:.1%}" for x in r["final_routing_per_layer"])
        evaluated = "dense" if r["eval_topk"] is None else f"K={r['eval_topk']}"
        lines.append(f"| {name} (evaluated {evaluated}) | {r['final_accuracy']:.1%} | "
                     f"{(r['final_accuracy'] - dense) * 100:+.1f} pt | {r['final_routing']:.1%} | "
                     f"{per_layer} | {r['seconds']:.0f} s |")
    lines += ["", "Routing accuracy of the dense run is measured as if it routed at K = 2."]
    return "\n".join(lines) + "\n"


def save_plot(result, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in result["runs"]:
        steps = [h["step"] for h in r["history"]]
        acc_key = "accuracy" if r["eval_topk"] is None else "accuracy_at_target_k"
        axes[0].plot(steps, [h[acc_key] for h in r["history"]], label=r["name"])
        axes[1].plot(steps, [h["routing"] for h in r["history"]], label=r["name"])
    axes[1].axhline(result["random_routing"], color="gray", linestyle=":", label="random")
    axes[0].set(title="answer accuracy (gaze runs at K=2)", xlabel="step", ylim=(0, 1.02))
    axes[1].set(title="routing accuracy at K=2 (best layer)", xlabel="step", ylim=(0, 1.02))
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    run(args.steps, args.batch, args.eval_size, args.seed, args.out, not args.no_plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
