"""Run by tests/test_distributed.py under torchrun (gloo, CPU): each rank writes what its loaders yield."""

import json
import sys

import torch.distributed as dist

from dalimix import ImageLoader
from dalimix.mix import Mixup
from dalimix.pipeline import default_num_threads


def main(root: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {"rank": rank, "world": dist.get_world_size(), "default_threads": default_num_threads()}
    for policy in ("partial", "drop", "fill"):
        loader = ImageLoader(
            root=root,
            batch_size=3,
            size=16,
            device="cpu",
            seed=7,
            num_threads=1,
            last_batch_policy=policy,
            mix=Mixup(mixup_alpha=1.0, mode="elem"),
        )
        result[policy] = {"shard": [loader.shard_id, loader.num_shards], "len": len(loader), "epochs": []}
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = []
            for images, targets in loader:
                info = loader.last_batch
                batches.append(
                    {
                        "ids": info.sample_ids.tolist(),
                        "labels": targets.argmax(1).tolist(),
                        "lam": info.params.lam.tolist(),
                        "mean": float(images.double().mean()),
                    }
                )
            result[policy]["epochs"].append(batches)
        loader.close()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result["partial"]["epochs"][0][0]["ids"])
    result["gathered_first_batches"] = gathered
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
