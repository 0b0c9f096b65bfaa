"""Scale rehearsal of the training input: LLaVA-665K-sized prepared data into Ray Train ranks.

    python benchmarks/run.py scale --rows 66500 665000 [--workers 2] [--seconds 20]
        [--workdir /tmp/llava-scale] [--baseline-max-rows 66500] [--timeout 900]

For each N it writes N rows straight in the prepared shard format (``prepare``'s schema, row
groups of 64 rows, shards of about 256 MB): a LLaVA-665K-like mix (94% image rows of 576 image
positions plus a log-normal text length, 6% long text-only conversations) with real 336 px JPEGs
of about 45 KB, drawn from a pool of distinct images. Then, each in a fresh process with its own
local Ray, it measures two designs of the training input on the same shards:

- ``stream`` (llava-ray now): the driver indexes footers and light columns, builds the windowed
  schedule, and each rank streams its rows (:class:`llava_ray.training.stream.RankStream`).
- ``baseline`` (llava-ray before): the driver reads the light columns with Ray Data, tags every
  scheduled read with its rank and position, sorts the whole schedule with its image bytes and
  materializes it in the object store; each rank iterates its dataset (the removed
  ``scheduled_datasets``, kept below as the baseline).

Measured per design and N: driver index + schedule time, driver peak RSS (over its RSS after
``ray.init``), time from the job's start to each rank's first micro-batch, each rank's steady
samples/s for ``--seconds`` (rows read and collated as training does: packed, images decoded and
normalised for CLIP-336), and the object store's peak use and spilled bytes. The loader's rate
is set against one GPU worker's consumption at LLaVA-1.5's reported stage-1 pace (558K samples in
3.5 h on 8 A100s: 5.5 samples/s per GPU). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

STAGE1_SAMPLES_PER_GPU_S = 558_000 / (3.5 * 3600 * 8)  # LLaVA-1.5-7B stage 1 on 8x A100 (reported)
IMAGE_POSITIONS = 576  # CLIP ViT-L/14 at 336 px
IMAGE_POOL = 48
ROWS_PER_GROUP = 64
SHARD_BYTES = 256 * 2**20
MICRO_BATCH = 16
GLOBAL_BATCH = 256  # stage 1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- data ---------------------------------------------------------------------------------------


def image_pool(count: int, seed: int) -> list[bytes]:
    """Distinct 336 px JPEGs (quality 95, 4:4:4 as prepare writes them) of photo-like size."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(count):
        base = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((336, 336), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 5, (336, 336, 3))
        array = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(array).filter(ImageFilter.SMOOTH)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95, subsampling=0)
        pool.append(buffer.getvalue())
    return pool


def write_prepared(root: Path, rows: int, seed: int = 0) -> dict[str, Any]:
    """N rows in the prepared shard layout at ``root`` (kept and reused when complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llava_ray.data.samples import PREPARED_SCHEMA

    report_path = root / "report.json"
    if report_path.exists() and json.loads(report_path.read_text())["written"] == rows:
        return json.loads(report_path.read_text())
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.parquet"):
        stale.unlink()
    rng = np.random.default_rng(seed)
    pool = image_pool(IMAGE_POOL, seed)
    is_image = rng.random(rows) >= 0.06
    text = np.where(
        is_image,
        np.clip(rng.lognormal(5.0, 0.7, rows), 16, 1472),
        np.clip(rng.lognormal(6.3, 0.6, rows), 32, 2048),
    ).astype(np.int32)
    lengths = text + np.where(is_image, IMAGE_POSITIONS, 0).astype(np.int32)
    supervised = np.maximum(1, (text * 0.4).astype(np.int32))
    order = rng.permutation(rows)  # keys are not in file order, as Ray Data's writers leave them
    started, written_bytes, shard, writer, shard_bytes = time.perf_counter(), 0, 0, None, 0
    for begin in range(0, rows, ROWS_PER_GROUP):
        keys = order[begin : begin + ROWS_PER_GROUP]
        ids, labels, images = [], [], []
        for key in keys:
            count = int(lengths[key])
            tokens = rng.integers(3, 32000, count, dtype=np.int32)
            label = np.full(count, -100, dtype=np.int32)
            label[-int(supervised[key]) - 1 :] = tokens[-int(supervised[key]) - 1 :]
            ids.append(tokens)
            labels.append(label)
            images.append([pool[int(key) % IMAGE_POOL]] if is_image[key] else [])
        table = pa.table(
            {
                "row": pa.array(keys, pa.int64()),
                "id": [f"sample-{k}" for k in keys],
                "source": ["llava_v1_5_mix665k"] * len(keys),
                "modality": ["image" if is_image[k] else "text" for k in keys],
                "input_ids": pa.array(ids, pa.list_(pa.int32())),
                "labels": pa.array(labels, pa.list_(pa.int32())),
                "length": pa.array(lengths[keys], pa.int32()),
                "num_supervised": pa.array(supervised[keys], pa.int32()),
                "images": pa.array(images, pa.list_(pa.binary())),
            },
            schema=PREPARED_SCHEMA,
        )
        if writer is None:
            writer = pq.ParquetWriter(
                root / f"shard-{shard:05d}.parquet",
                PREPARED_SCHEMA,
                compression="snappy",
                use_dictionary=["id", "source", "modality"],  # images stay plain: distinct in real data
            )
        writer.write_table(table, row_group_size=ROWS_PER_GROUP)
        shard_bytes += table.nbytes
        written_bytes += table.nbytes
        if shard_bytes >= SHARD_BYTES:
            writer.close()
            writer, shard, shard_bytes = None, shard + 1, 0
    if writer is not None:
        writer.close()
    report = {
        "written": rows,
        "input": rows,
        "skipped": {},
        "bytes": written_bytes,
        "image_bytes_mean": float(np.mean([len(p) for p in pool])),
        "image_rows": int(is_image.sum()),
        "write_s": round(time.perf_counter() - started, 1),
    }
    report_path.write_text(json.dumps(report))
    return report


# ---- the baseline: llava-ray's training input before streaming ----------------------------------

SORT_RANGE_ROWS = 2048


def _attach_schedule(batch, plan):
    return batch.merge(plan, on="row", how="inner")


def baseline_scheduled_datasets(dataset, plans):
    """The removed ``training.driver.scheduled_datasets``: tag, sort and materialize every read."""
    import pandas as pd

    offsets = np.cumsum([0, *(len(plan) for plan in plans.values())])
    tagged = pd.concat(
        [
            plan[["row", "seq"]].assign(order=plan["seq"].to_numpy() + offset)
            for plan, offset in zip(plans.values(), offsets[:-1], strict=True)
        ],
        ignore_index=True,
    )
    total, edges = int(offsets[-1]), [int(o) for o in offsets[1:-1]]
    boundaries = sorted({*range(SORT_RANGE_ROWS, total, SORT_RANGE_ROWS), *edges})
    ordered = (
        dataset.map_batches(_attach_schedule, batch_format="pandas", fn_args=(tagged,))
        .sort("order", boundaries=boundaries or None)
        .drop_columns(["order"])
        .materialize()
    )
    pieces = ordered.split_at_indices(edges) if edges else [ordered]
    return dict(zip(plans, pieces, strict=True))


def rows_from_columns(columns: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(columns)
    return [{key: columns[key][i] for key in keys} for i in range(len(columns[keys[0]]))]


# ---- one case, in its own process ---------------------------------------------------------------


class StoreMonitor(threading.Thread):
    """Polls the object store's use and spilled bytes every half second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_used = 0
        self.spilled = 0
        self.running = True

    def run(self) -> None:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        while self.running:
            try:
                stats = get_memory_info_reply(state).store_stats
                self.peak_used = max(self.peak_used, int(stats.object_store_bytes_used))
                self.spilled = max(self.spilled, int(stats.spilled_bytes_total))
            except Exception:  # a poll during shutdown
                pass
            time.sleep(0.5)


def rank_loop(config: dict[str, Any]) -> None:
    """Each rank: time to its first micro-batch, then its steady rate for ``seconds``."""
    entered = time.time()
    import ray
    import ray.train

    from llava_ray.config.model_sources import TowerInput
    from llava_ray.training.packing import pack_micro_batch

    rank = ray.train.get_context().get_world_rank()
    tower = TowerInput(336, CLIP_MEAN, CLIP_STD)
    collate = lambda rows: pack_micro_batch(rows, 0, tower)  # noqa: E731
    if config["design"] == "stream":
        from llava_ray.training.stream import RankStream

        stream = RankStream(
            ray.get(config["units"]),
            ray.get(config["reads"][rank]),
            micro_batch_size=MICRO_BATCH,
            collate=collate,
            reads_per_epoch=config["reads_per_epoch"],
        )
        batches = iter(stream)
    else:
        shard = ray.train.get_dataset_shard(f"rank{rank}")
        batches = (
            collate(rows_from_columns(columns))
            for columns in shard.iter_batches(
                batch_size=MICRO_BATCH, batch_format="numpy", prefetch_batches=2
            )
        )
        stream = None
    next(batches)
    first = time.time()
    samples, until = 0, first + config["seconds"]
    while time.time() < until:
        next(batches)
        samples += MICRO_BATCH
    result = {
        "rank": rank,
        "first_batch_at": first,
        "loop_entered_at": entered,
        "samples_per_s": samples / (time.time() - first),
        "rows_held_peak": getattr(stream, "rows_held_peak", None),
        "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(result))


def run_case(design: str, prepared: str, workers: int, seconds: float, out: str) -> dict[str, Any]:
    started = time.time()
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from llava_ray.data.prepare import read_prepared
    from llava_ray.training.schedule import build_schedule

    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ray_ready = time.time()
    rss_after_init = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    monitor = StoreMonitor()
    monitor.start()
    Path(out).mkdir(parents=True, exist_ok=True)
    scan_started = time.time()
    kwargs = dict(
        global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH, world_size=workers, epochs=1, seed=0
    )
    config: dict[str, Any] = {"design": design, "seconds": seconds, "out": out}
    datasets = None
    if design == "stream":
        from llava_ray.training.driver import rank_reads
        from llava_ray.training.stream import index_prepared

        index = index_prepared(prepared)
        rows = index.rows
        schedule = build_schedule(
            rows["length"].to_numpy(),
            rows["is_image"].to_numpy(),
            rows["num_supervised"].to_numpy(),
            units=rows["unit"].to_numpy(),
            window=16384,
            **kwargs,
        )
        config |= {
            "units": ray.put(index.units),
            "reads": [ray.put(r) for r in rank_reads(rows, schedule)],
            "reads_per_epoch": schedule.steps_per_epoch * GLOBAL_BATCH // workers,
        }
    else:
        import pandas as pd

        dataset = read_prepared(prepared)
        index = (
            dataset.select_columns(["row", "length", "modality", "num_supervised"])
            .to_pandas()
            .sort_values("row", ignore_index=True)
        )
        schedule = build_schedule(
            index["length"].to_numpy(),
            (index["modality"] == "image").to_numpy(),
            index["num_supervised"].to_numpy(),
            **kwargs,
        )
        plans = {
            f"rank{rank}": pd.DataFrame(
                {
                    "row": index["row"].to_numpy()[schedule.rank_rows(rank)],
                    "seq": np.arange(schedule.rank_rows(rank).size),
                }
            )
            for rank in range(workers)
        }
        datasets = baseline_scheduled_datasets(dataset, plans)
    scheduled = time.time()
    trainer = TorchTrainer(
        rank_loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"scale-{design}", storage_path=str(Path(out) / "runs")),
        **(
            {"datasets": datasets, "dataset_config": ray.train.DataConfig(datasets_to_split=[])}
            if datasets
            else {}
        ),
    )
    trainer.fit()
    monitor.running = False
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(workers)]
    result = {
        "design": design,
        "ray_init_s": round(ray_ready - started, 1),
        "driver_scan_schedule_s": round(scheduled - scan_started, 2),
        "rank_loop_entered_s": [round(r["loop_entered_at"] - started, 1) for r in ranks],
        "driver_rss_after_init_mb": round(rss_after_init),
        "driver_rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "first_batch_s": [round(r["first_batch_at"] - started, 1) for r in ranks],
        "samples_per_s_per_rank": [round(r["samples_per_s"], 1) for r in ranks],
        "rank_rows_held_peak": [r["rows_held_peak"] for r in ranks],
        "rank_rss_peak_mb": [round(r["rss_peak_mb"]) for r in ranks],
        "object_store_peak_mb": round(monitor.peak_used / 2**20),
        "spilled_mb": round(monitor.spilled / 2**20),
    }
    ray.shutdown()
    return result


# ---- what the windows change --------------------------------------------------------------------


def padding_effect(prepared: str, workers: int = 8, window: int = 16384) -> dict[str, Any]:
    """Padding of unpacked micro-batches under the global and the windowed grouping, on these lengths.

    Packing (the default) pads nothing either way; this is what ``train.packing=false`` would pad.
    """
    from llava_ray.training.schedule import build_schedule
    from llava_ray.training.stream import index_prepared

    rows = index_prepared(prepared).rows
    lengths = rows["length"].to_numpy()
    result: dict[str, Any] = {"workers": workers, "micro_batch": MICRO_BATCH, "window": window}
    for name, units in (("global", None), ("windowed", rows["unit"].to_numpy())):
        schedule = build_schedule(
            lengths,
            rows["is_image"].to_numpy(),
            rows["num_supervised"].to_numpy(),
            global_batch_size=128,
            micro_batch_size=MICRO_BATCH,
            world_size=workers,
            epochs=1,
            seed=0,
            units=units,
            window=window,
        )
        micro = lengths[schedule.order.reshape(-1, MICRO_BATCH)]
        padded = (micro.max(axis=1) * MICRO_BATCH).sum()
        result[f"{name}_padding_fraction"] = round(float(1 - micro.sum() / padded), 4)
    return result


# ---- the whole rehearsal ------------------------------------------------------------------------


def rehearse(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"workers": args.workers, "cpus": os.cpu_count(), "seconds": args.seconds}
    for rows in args.rows:
        prepared = Path(args.workdir) / f"prepared-{rows}"
        data = write_prepared(prepared, rows)
        print(f"[scale] {rows} rows at {prepared}: {data['bytes'] / 2**30:.1f} GiB", flush=True)
        cases: dict[str, Any] = {"data": data, "padding": padding_effect(str(prepared))}
        designs = ["stream"] + (["baseline"] if rows <= args.baseline_max_rows else [])
        for design in designs:
            out = Path(args.workdir) / f"case-{design}-{rows}"
            command = [
                sys.executable,
                __file__,
                "_case",
                design,
                str(prepared),
                str(args.workers),
                str(args.seconds),
                str(out),
            ]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                cases[design] = json.loads(lines[-1]) if lines else {"error": done.stderr[-2000:]}
            except subprocess.TimeoutExpired:
                cases[design] = {"error": f"no result within {args.timeout} s"}
            print(f"[scale] {rows} {design}: {json.dumps(cases[design])}", flush=True)
        results[str(rows)] = cases
    results |= summary(results, args)
    return results


def summary(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The goals at the largest N, and a paper extrapolation to 10M rows."""
    from llava_ray.training.stream import INDEX_BYTES_PER_ROW, READ_BYTES

    largest = str(max(args.rows))
    stream = results[largest].get("stream", {})
    first = max(stream.get("first_batch_s", [float("inf")]))
    rate = min(stream.get("samples_per_s_per_rank", [0.0]))
    return {
        "goals": {
            "rows": int(largest),
            "first_batch_within_60_s": first <= 60,
            "loader_over_stage1_gpu": round(rate / STAGE1_SAMPLES_PER_GPU_S, 1),
            "loader_at_least_3x": rate >= 3 * STAGE1_SAMPLES_PER_GPU_S,
        },
        "driver_bytes_per_row": INDEX_BYTES_PER_ROW,
        "rank_bytes_per_read": READ_BYTES,
        "extrapolated_10m": {
            "driver_index_mb": round(10_000_000 * INDEX_BYTES_PER_ROW / 2**20),
            "reads_per_epoch_mb_all_ranks": round(10_000_000 * READ_BYTES / 2**20),
        },
    }


def main() -> None:
    """One case in its own process (``rehearse`` runs ``scale_rehearsal.py _case ...``)."""
    design, prepared, workers, seconds, out = sys.argv[2:7]
    print(json.dumps(run_case(design, prepared, int(workers), float(seconds), out)), flush=True)


if __name__ == "__main__":
    main()
