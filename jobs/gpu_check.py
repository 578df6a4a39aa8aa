"""A short GPU training check for a machine that has CUDA: NCCL group, device placement and
throughput, on an embedded local Spark with one agent per visible GPU.

    python jobs/gpu_check.py --json gpu_check.json

Checks: every agent trained on cuda:<local rank> with the nccl backend, the result equals a
CPU reference of the same run (float tolerance), and prints samples/s against a one-process
GPU loop. Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spark_ddl import TorchEstimator, get_or_create_session  # noqa: E402
from spark_ddl.networks import MLP  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="0: one per visible GPU")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device visible: nothing to check")
        return 2
    gpus = torch.cuda.device_count()
    workers = args.workers or gpus  # NCCL needs one GPU per rank
    spark = get_or_create_session(num_workers=workers, app_name="spark_ddl-gpu-check")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, 64)).astype(np.float32)
    y = (x[:, :10].argmax(axis=1)).astype(np.int64)
    frame = spark.createDataFrame(
        __import__("pandas").DataFrame({"features": list(x), "label": y})).repartition(workers).cache()
    frame.count()
    torch.manual_seed(0)
    kwargs = {"in_features": 64, "out_features": 10, "hidden": [512, 512]}
    report = {"gpus": gpus, "workers": workers, "device_name": torch.cuda.get_device_name(0)}
    for use_gpu in (True, False):
        est = TorchEstimator(model="spark_ddl.networks:MLP", model_kwargs=kwargs, loss="cross_entropy",
                             lr=0.05, batch_size=256, epochs=args.epochs, num_workers=workers,
                             shuffle=False, use_gpu=use_gpu, timeout=120)
        started = time.perf_counter()
        model = est.fit(frame)
        label = "gpu" if use_gpu else "cpu"
        report[label] = {"seconds": time.perf_counter() - started, "device": model.summary["device"],
                         "backend": model.summary["backend"],
                         "samples_per_s": model.history[-1]["samples_per_s"],
                         "final_loss": model.history[-1]["train_loss"]}
        report[f"{label}_state"] = {k: v.cpu() for k, v in model.get_module().state_dict().items()}
    gpu_state, cpu_state = report.pop("gpu_state"), report.pop("cpu_state")
    worst = max(((gpu_state[k] - cpu_state[k]).abs().max() / (cpu_state[k].abs().max() + 1e-12)).item()
                for k in gpu_state)
    report["max_relative_difference_gpu_vs_cpu"] = worst
    # one-process GPU baseline over the same samples
    module = MLP(**kwargs).cuda()
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    xt, yt = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, args.rows, 256 * workers):
        loss = torch.nn.functional.cross_entropy(module(xt[start:start + 256 * workers]), yt[start:start + 256 * workers])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    report["single_process_gpu_samples_per_s"] = args.rows / (time.perf_counter() - started)
    checks = {
        "gpu_agents_used_cuda": report["gpu"]["device"].startswith("cuda"),
        "gpu_agents_used_nccl": report["gpu"]["backend"] == "nccl",
        "gpu_equals_cpu_within_1e-3": worst <= 1e-3,
    }
    report["checks"] = checks
    print(json.dumps(report, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
