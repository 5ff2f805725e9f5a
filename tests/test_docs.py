"""Every code block of README.md and docs/*.md runs here (or is checked), so no snippet can rot.

- ```python blocks are executed on the CPU, on the demo data: the few words that point at a GPU or
  at ImageNet are rewritten first (``device="cuda"`` -> ``"cpu"``, ``root="train/"`` -> the demo
  data, sizes 224 -> 32, batch 256 -> 8, ImageNet's 1000 classes -> 8), names a snippet leaves to the reader (``model``,
  ``epochs``, ``my_net``, ``vit``, ...) are given small stand-ins, and every loader yields at most
  three batches per iteration.
- ```diff blocks must agree with the files they show.
- ```console blocks are commands shown, not run: GPU runs, multi-process runs, minutes-long
  benchmarks and `make` itself (the CLI is tested in test_cli.py). ```text blocks are not code.
Any other info string fails the test, so a new block has to choose.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)
KINDS = {"python", "diff", "console", "text"}

REWRITES = [
    (r'device="cuda(:\d+)?"', 'device="cpu"'),
    (r"\.cuda\(\)", ""),
    (r'root="(train/|imagenet/train|/imagenet/train)"', "root=DEMO"),
    (r"batch_size=256", "batch_size=8"),
    (r"\bsize=224", "size=32"),
    (r"Mixup\(\.\.\.\)", "Mixup()"),
    (r"num_classes=1000", "num_classes=8"),
]


def blocks():
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            yield page.relative_to(REPO).as_posix(), line, m.group(1).strip(), m.group(2)


ALL = list(blocks())


def test_every_block_has_a_known_kind():
    bad = [(p, line, kind) for p, line, kind, _ in ALL if kind not in KINDS]
    assert not bad, f"code blocks with an info string other than {sorted(KINDS)}: {bad}"
    assert sum(kind == "python" for *_, kind, _ in ALL) >= 8


class TinyNet:
    """A small CNN for the demo data's 8 classes, casting its input to float32."""

    def __new__(cls, num_classes: int = 8):
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(
                    nn.Conv2d(3, 8, 3, stride=2),
                    nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(),
                    nn.Linear(8, num_classes),
                )

            def forward(self, x):
                return self.body(x.to(torch.float32))

        return Net()


@pytest.fixture
def namespace(tmp_path, monkeypatch):
    """What a python block may use without defining it, and loaders that stop after 3 batches."""
    import timm
    import torch

    import dalimix
    from dalimix.loader import ImageLoader
    from dalimix.mix import Mixup

    monkeypatch.chdir(tmp_path)
    original = ImageLoader.__iter__

    def three_batches(self):
        for i, batch in enumerate(original(self)):
            yield batch
            if i == 2:
                break

    monkeypatch.setattr(ImageLoader, "__iter__", three_batches)
    demo = dalimix.demo_data.demo_dataset()
    model = TinyNet()
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, num_classes=8, embed_dim=32, depth=1, num_heads=2
    )
    loader = ImageLoader(
        root=demo,
        batch_size=8,
        size=32,
        device="cpu",
        last_batch_policy="drop",
        mix=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0),
    )
    masks = torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Conv2d(3, 1, 1)).requires_grad_(False)
    ns = dict(
        DEMO=demo,
        model=model,
        epochs=1,
        total_steps=3,
        vit=vit,
        C=8,
        H=32,
        W=32,
        loader=loader,
        opt=torch.optim.SGD(model.parameters(), lr=0.1),
        my_net=lambda x: masks(x.float()),
        logits=torch.zeros(4),
    )
    yield ns
    loader.close()


PYTHON = [(p, line, code) for p, line, kind, code in ALL if kind == "python"]


@pytest.mark.slow
@pytest.mark.parametrize("page, line, code", PYTHON, ids=[f"{p}:{line}" for p, line, _ in PYTHON])
def test_python_block_runs(page, line, code, namespace):
    for pattern, replacement in REWRITES:
        code = re.sub(pattern, replacement, code)
    exec(compile(code, f"{page}:{line}", "exec"), namespace)


DIFFS = [(p, line, code) for p, line, kind, code in ALL if kind == "diff"]


@pytest.mark.parametrize("page, line, code", DIFFS, ids=[f"{p}:{line}" for p, line, _ in DIFFS])
def test_diff_block_matches_the_examples(page, line, code):
    old = (REPO / "examples" / "train_plain_torchvision.py").read_text().splitlines()
    new = (REPO / "examples" / "train_plain.py").read_text().splitlines()
    for text in code.splitlines():
        if text.startswith("@@") or not text:
            continue
        sign, body = text[0], text[1:]
        if sign in "+ ":
            assert body in new, f"{page}:{line}: not in examples/train_plain.py: {body!r}"
        if sign in "- ":
            assert body in old, f"{page}:{line}: not in examples/train_plain_torchvision.py: {body!r}"


def test_readme_is_short_and_its_quick_start_fits_ten_lines():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 15 * 1024
    quick = readme.split("## Quick start", 1)[1]
    code = FENCE.search(quick)
    assert code.group(1) == "python"
    assert len([line for line in code.group(2).splitlines() if line.strip()]) <= 10
    assert "demo_dataset()" in code.group(2) and 'device="cpu"' in code.group(2)


def test_readme_says_how_to_install_both_ways():
    readme = (REPO / "README.md").read_text()
    for text in (
        "source .venv/bin/activate",
        "pip install .",
        "pip install '.[cuda]'",
        "pip install '.[bench]'",
        "make demo",
        "make test",
    ):
        assert text in readme, text


def test_docs_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: link to {target} which does not exist"
