"""A small version of the routing experiment runs end to end (the full one is
`python -m experiments.routing_task`; its results are in experiments/results/)."""
import json
import os

import torch

from experiments import routing_task


def test_task_batches_are_consistent():
    cfg = routing_task.TaskConfig()
    image, questions, answers, target = routing_task.make_batch(cfg, 8, torch.Generator().manual_seed(0))
    side = cfg.grid * cfg.region
    assert image.shape == (8, side, side, cfg.feature_dim)
    assert (questions[:, 2] >= 2).all() and (questions[:, 2] < 2 + cfg.shapes).all()
    assert (answers >= 2 + cfg.shapes).all() and (answers < cfg.vocab).all()
    # the asked region's features carry the asked shape and the answer's colour
    row, col = target // cfg.grid, target % cfg.grid
    region = image[torch.arange(8), row * cfg.region, col * cfg.region]
    assert (region.gather(1, (questions[:, 2] - 2)[:, None]) > 0).float().mean() > 0.7


def test_small_run_writes_its_results(tmp_path):
    result = routing_task.run(steps=6, batch=8, eval_size=16, seed=0, out=str(tmp_path),
                              plot=False)
    assert [r["name"] for r in result["runs"]] == ["dense", "progressive", "fixed"]
    for r in result["runs"]:
        assert 0.0 <= r["final_accuracy"] <= 1.0 and 0.0 <= r["final_routing"] <= 1.0
        assert len(r["final_routing_per_layer"]) == 2 and r["history"]
    with open(os.path.join(tmp_path, "routing_task.json")) as f:
        assert json.load(f)["topk"] == 2
    assert "routing accuracy" in open(os.path.join(tmp_path, "routing_task.md")).read()
