"""Every code block of README.md and docs/*.md runs here (or is checked), so no snippet can rot.

- ```python blocks are executed on the CPU, on the demo data: the few words that point at a GPU or
  at ImageNet are rewritten first (``device="cuda"`` -> ``"cpu"``, ``root="train/"`` -> the demo
  data, sizes 224 -> 32, batch 256 -> 8, ImageNet's 1000 classes -> 8), names a snippet leaves to the reader (``model``,
  ``epochs``, ``my_net``, ``vit``, ...) are given small stand-ins, and every loader yields at most
  three batches per iteration.
- ```diff blocks must agree with the files they show.
- ```console blocks: each command (comments dropped, ``\\`` continuations joined) must match one of
  ``CONSOLE_RULES``, which runs it as written where that is cheap on the CPU (smoke runs, dry runs,
  the two-process CPU torchrun) and otherwise checks it precisely: ``make T`` -> ``make -n T``,
  ``pip install '.[x]'`` -> the extra exists and holds the packages the comment names, GPU runs,
  ImageNet runs and full benchmarks -> parsed by the script's own argparse (torchrun's too).
  Each rule says why it does not run its command. A command no rule matches fails.
- ```text blocks are not code.
Any other info string fails the test, so a new block has to choose.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# a fence may be indented (a block inside a list item); its body is dedented
FENCE = re.compile(r"^([ \t]*)```([^\n`]*)\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)
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
            yield page.relative_to(REPO).as_posix(), line, m.group(2).strip(), textwrap.dedent(m.group(3))


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


# ----------------------------------------------------------------------------- console blocks
def console_commands():
    """``(page, line, argv, comment)`` for each command of each ```console block."""
    for page, line, kind, code in ALL:
        if kind != "console":
            continue
        for i, text in enumerate(re.sub(r"\\\n[ \t]*", " ", code).splitlines()):
            argv = shlex.split(text, comments=True)
            if argv:
                yield page, line + 1 + i, argv, text.partition(" #")[2].strip()


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DALI_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _run(argv, cwd, timeout=300):
    proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{shlex.join(map(str, argv))}: rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def _script_module(path: str):
    """The example/benchmark script at ``path`` (relative to the repository), imported, not run."""
    spec = importlib.util.spec_from_file_location(f"docs_{Path(path).stem}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse_script(path: str, args: list[str]):
    """``args`` parsed by the script's own ``parse_args`` (argparse: a wrong flag exits, failing the test)."""
    from unittest import mock

    import torch

    assert (REPO / path).is_file(), f"{path} does not exist"
    module = _script_module(path)
    # a GPU command is parsed as on a GPU machine (the scripts refuse --device cuda where torch sees none)
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        return module.parse_args(args)


def check_make(argv, comment, tmp_path):
    target = argv[1]
    phony = re.search(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    assert target in phony, f"make {target}: not a target of the Makefile ({phony})"
    plan = _run(["make", "-n", target], REPO, timeout=60)
    assert plan.strip(), f"make -n {target} prints nothing"


def check_activate(argv, comment, tmp_path):
    # `make demo`/`make test` create .venv with `python -m venv`, which writes bin/activate
    if (REPO / ".venv" / "bin" / "python").exists():
        assert (REPO / argv[1]).is_file()
    else:
        assert re.search(r"-m venv \.venv$", _run(["make", "-n", "demo"], REPO, timeout=60), re.M)
    assert argv[1] == ".venv/bin/activate"


def check_pip_install(argv, comment, tmp_path):
    import tomllib

    spec = argv[2]
    m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", spec)
    assert m, f"pip install {spec}: only this checkout ('.' or '.[extra]') is documented"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "dalimix" and project["dependencies"]
    for extra in m.group(1).split(",") if m.group(1) else []:
        assert extra in project["optional-dependencies"], f"pip install {spec}: no extra {extra!r} in pyproject.toml"
        for req in project["optional-dependencies"][extra]:
            name = re.match(r"[A-Za-z0-9_.]+", req).group(0).lower().split("-")[0]
            assert name in comment.lower(), f"pip install {spec}: the comment does not name {req}"


def check_dalimix(argv, comment, tmp_path):
    from dalimix.bench.command import settings_from_args
    from dalimix.cli import build_parser

    args = build_parser().parse_args(argv[1:])
    assert args.command == "bench"
    settings = settings_from_args(args)
    for claim in re.findall(r"batch (\d+)(?: and (\d+))?", comment):
        assert tuple(settings.batch_sizes) == tuple(int(b) for b in claim if b), comment
    for px in re.findall(r"(\d+) px", comment):
        assert settings.size == int(px), comment
    for n in re.findall(r"(\d+) images", comment):
        assert settings.max_images == int(n), comment


def run_script(argv, comment, tmp_path):
    # in a scratch folder: the script writes its results under ./benchmarks/results
    _run([sys.executable, str(REPO / argv[1]), *argv[2:]], tmp_path)


def check_script(argv, comment, tmp_path):
    _parse_script(argv[1], argv[2:])


def run_bash(argv, comment, tmp_path):
    _run(["bash", str(REPO / argv[1]), *argv[2:]], REPO, timeout=120)


def run_bash_dry(argv, comment, tmp_path):
    assert argv[2:] == []
    _run(["bash", str(REPO / argv[1]), "--dry-run"], REPO, timeout=120)


def run_torchrun(argv, comment, tmp_path):
    out = _run([sys.executable, "-m", "torch.distributed.run", *argv[1:]], REPO, timeout=600)
    assert "epoch 1:" in out, out


def check_torchrun(argv, comment, tmp_path):
    from torch.distributed.run import get_args_parser

    launch = get_args_parser().parse_args(argv[1:])
    args = _parse_script(launch.training_script, launch.training_script_args)
    assert args.data and Path(launch.training_script).name == "train_ddp.py"


# (pattern the whole command must match, check, why it runs or what is checked instead); first match wins
CONSOLE_RULES = [
    (
        r"make (demo|test|bench)",
        check_make,
        "make sets up .venv from the package registry first (and `make test` is this run): `make -n` checks the target and its recipe",
    ),
    (r"source \.venv/bin/activate", check_activate, "the venv make creates: it has bin/activate"),
    (
        r"pip install \S+",
        check_pip_install,
        "needs the package registry: the extra exists and holds what the comment names (tests/test_install.py builds and installs the wheel)",
    ),
    (
        r"dalimix bench .*--device cuda.*|dalimix bench|dalimix bench --data \S+ .*",
        check_dalimix,
        "CUDA, ImageNet, or minutes long: parsed by the CLI's parser, the settings match the comment",
    ),
    (
        r"dalimix bench --quick",
        check_dalimix,
        "~50 CPU-seconds: tests/test_bench.py runs `bench --quick` on a 20-file set; here the parsed settings",
    ),
    (r"python benchmarks/\w+\.py --quick", run_script, "runs as written (seconds)"),
    (
        r"python (benchmarks|examples)/\w+\.py( .*)?",
        check_script,
        "minutes long or CUDA: parsed by the script's argparse",
    ),
    (r"bash benchmarks/gpu_suite\.sh --dry-run", run_bash, "runs as written (prints the plan)"),
    (
        r"bash benchmarks/gpu_bundle\.sh",
        run_bash_dry,
        "downloads GBs of wheels from the registry for ~20 min: its --dry-run",
    ),
    (
        r"torchrun --standalone --nproc_per_node 2 examples/\w+\.py .*--device cpu.*",
        run_torchrun,
        "runs as written: 2 gloo processes on the CPU",
    ),
    (r"torchrun .*", check_torchrun, "GPUs / several machines: torchrun's own parser, then the script's"),
]


def rule_for(argv):
    command = shlex.join(argv)
    return next((rule for rule in CONSOLE_RULES if re.fullmatch(rule[0], command)), None)


COMMANDS: dict[str, tuple[list[str], str, list[str]]] = {}
for _page, _line, _argv, _comment in console_commands():
    COMMANDS.setdefault(shlex.join(_argv), (_argv, _comment, []))[2].append(f"{_page}:{_line}")


def test_every_console_command_has_a_rule():
    assert len(COMMANDS) >= 15
    missing = [places for command, (argv, _, places) in COMMANDS.items() if rule_for(argv) is None]
    assert not missing, f"console commands no rule in CONSOLE_RULES covers: {missing}"
    assert rule_for(["rm", "-rf", "build"]) is None and rule_for(["make", "clean-venv"]) is None


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS), ids=[places[0] for _, _, places in COMMANDS.values()])
def test_console_command(command, tmp_path, monkeypatch):
    argv, comment, places = COMMANDS[command]
    rule = rule_for(argv)
    assert rule is not None, f"{places}: no rule in CONSOLE_RULES covers {command!r}"
    monkeypatch.chdir(tmp_path)
    rule[1](argv, comment, tmp_path)


def test_readme_is_short_and_its_quick_start_fits_ten_lines():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 15 * 1024
    quick = readme.split("## Quick start", 1)[1]
    code = FENCE.search(quick)
    assert code.group(2) == "python"
    assert len([line for line in code.group(3).splitlines() if line.strip()]) <= 10
    assert "demo_dataset()" in code.group(3) and 'device="cpu"' in code.group(3)


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


def test_make_demo_takes_torchs_cpu_build_and_make_test_never_does():
    """A CPU `make demo` installs torch 2.13.0's CPU build; `make test` (torchvision 0.29.1 needs
    torch 2.14.1) and a GPU machine's `make demo` install 2.14.1 from the start."""

    def installs(*args):
        # -B: the recipes as on a fresh clone, also where .venv is set up already (as under make test)
        plan = subprocess.run(
            ["make", "-n", "-B", *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
        )
        return [line for line in plan.stdout.splitlines() if "pip install" in line and " -r " in line]

    demo = installs("demo", "CUDA=0")
    assert any("requirements/torch-cpu.txt" in line for line in demo), demo
    for goal in ("test", "lint", "bench"):
        assert not any("torch-cpu.txt" in line for line in installs(goal, "CUDA=0")), goal
    assert any("requirements/torch.txt" in line for line in installs("test", "CUDA=0"))
    gpu = installs("demo", "CUDA=1")
    assert any("requirements/torch.txt" in line and "requirements/cuda.txt" in line for line in gpu), gpu
    pins = {
        name: re.search(r"^torch==(\S+)$", (REPO / "requirements" / name).read_text(), re.M).group(1)
        for name in ("torch.txt", "torch-cpu.txt")
    }
    assert pins == {"torch.txt": "2.14.1", "torch-cpu.txt": "2.13.0"}
    assert "torch" not in re.findall(r"^([A-Za-z0-9_.-]+)==", (REPO / "requirements" / "base.txt").read_text(), re.M)
