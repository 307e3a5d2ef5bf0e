"""The documentation's code runs as written: README.md and docs/*.md.

A block that a test runs is a fenced block with a title (its fence at the start of a line), found
by that title on whichever page holds it, so pages can be reordered, split and rewritten without
breaking the tests:

    ```python title="quickstart"
    ...
    ```

Material for MkDocs shows the title above the block; GitHub ignores it. `TESTED` names every
titled block and the test that runs it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from learner.data import mnist_available

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TITLED = re.compile(r'^```python title="([^"]+)"[^\n]*\n(.*?)^```[ \t]*$', flags=re.S | re.M)

TESTED = {
    "quickstart": "test_quickstart_runs",
    "writing-a-callback": "test_callback_example_runs",
    "mixed-precision": "test_mixed_precision_example_runs",
    "seeing-inside-training": "test_seeing_inside_training_runs",
    "lr-find": "test_feature_examples_run",
    "schedules": "test_feature_examples_run",
    "torch-schedulers": "test_feature_examples_run",
    "trackers": "test_feature_examples_run",
    "checkpoints": "test_checkpoint_and_predictions_examples_run",
    "predictions": "test_checkpoint_and_predictions_examples_run",
    "batch-formats": "test_batches_page_runs",
    "several-outputs": "test_batches_page_runs",
    "no-targets": "test_batches_page_runs",
    "gan": "test_batches_page_runs",
    "stream": "test_steps_page_runs",
    "resume-at-a-step": "test_steps_page_runs",
}


def titled_blocks() -> list[tuple[str, str, Path]]:
    """(title, code, page) of every titled python block, in page order."""
    return [(m[1], m[2], page) for page in PAGES for m in TITLED.finditer(page.read_text("utf-8"))]


def block(name: str) -> str:
    """The code of the python block titled `name` in README.md or docs/*.md."""
    found = [code for title, code, _ in titled_blocks() if title == name]
    if not found:
        titles = ", ".join(sorted(title for title, _, _ in titled_blocks()))
        raise LookupError(
            f"No code block titled {name!r} in README.md or docs/*.md. Title the block with "
            f'```python title="{name}" (the titles now: {titles}).'
        )
    if len(found) > 1:
        raise LookupError(f"{len(found)} code blocks are titled {name!r}: give each its own title.")
    return found[0]


def test_titles_are_unique_and_each_block_is_tested() -> None:
    titles = [title for title, _, _ in titled_blocks()]
    assert sorted(set(titles)) == sorted(titles), "two blocks share a title"
    assert set(titles) == set(TESTED), "a titled block is not run by a test, or a test's is gone"
    assert all(callable(globals().get(test)) for test in TESTED.values())


def test_a_missing_block_is_a_clear_error() -> None:
    with pytest.raises(LookupError, match=r"No code block titled 'no-such-block'.*quickstart"):
        block("no-such-block")


def test_readme_is_a_front_page() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    assert len(readme.encode()) <= 10 * 1024, "the README is a front page: move details to docs/"
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), f"README links to {target}, which does not exist"


def test_callback_tables_match_the_code() -> None:
    import learner
    from learner.callbacks.order import ORDERS
    from learner.events import EVENTS, Callback

    for page in (ROOT / "README.md", ROOT / "docs" / "standard-callbacks.md"):
        rows = re.findall(r"^\| `(\w+CB)[(`].*?\| (-?\d+) \|", page.read_text("utf-8"), flags=re.M)
        assert {name: int(order) for name, order in rows} == ORDERS, page.name
    # The events column of standard-callbacks.md: the events each callback implements.
    text = (ROOT / "docs" / "standard-callbacks.md").read_text("utf-8")
    for name, events in re.findall(r"^\| `(\w+CB)[(`].*?\| -?\d+ \| ([^|]*) \|", text, flags=re.M):
        cls = getattr(learner, name)
        own = [
            e
            for e in EVENTS
            if any(e in vars(k) for k in cls.__mro__ if k not in (Callback, object))
        ]
        assert events.split(", ") == own, f"{name}: the table says {events}"


def test_files_named_in_the_docs_exist() -> None:
    for page in PAGES:
        named = re.findall(
            r"(?<![\w/.])((?:tests|examples|benchmarks|learner)/[\w/]+\.\w+)",
            page.read_text("utf-8"),
        )
        for path in named:
            assert (ROOT / path).is_file(), f"{page.relative_to(ROOT)} names {path}, which is gone"


def test_every_module_is_in_the_api_reference() -> None:
    api = "".join(page.read_text("utf-8") for page in (ROOT / "docs" / "api").glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)", api, flags=re.M))
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "learner").rglob("*.py")
        if path.name != "__init__.py"
    }
    assert sorted(modules - documented) == [], "add a `::: module` line to a docs/api/ page"
    assert sorted(documented - modules) == [], "the API reference names a module that is gone"


def test_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not mnist_available():
        pytest.skip("MNIST not found: set LEARNER_DATA to a folder holding MNIST/raw/")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(block("quickstart"), scope)
    assert scope["learn"].recorder.history[-1]["accuracy"] > 0.95
    assert (tmp_path / "loss.png").exists()


def test_callback_example_runs(tiny: dict[str, Any]) -> None:
    from learner import Learner

    learn = Learner(**tiny)
    scope: dict[str, Any] = {"learn": learn}
    exec(block("writing-a-callback"), scope)
    assert len(learn.recorder.losses) == 6  # 3 epochs of 2 batches: 100 is never reached
    learn.fit(3, cbs=[scope["StopAfterCB"](3)])
    assert len(learn.recorder.losses) == 6 + 3


def test_mixed_precision_example_runs(tiny: dict[str, Any]) -> None:
    import torch
    import torch.nn.functional as F

    scope: dict[str, Any] = {"model": tiny["model"], "dls": tiny["dls"], "F": F, "torch": torch}
    exec(block("mixed-precision"), scope)
    learn = scope["learn"]
    assert learn.mixed_precision.dtype == torch.bfloat16
    assert len(learn.recorder.losses) == 2 and learn.grad_clip.total_norm is not None


def test_seeing_inside_training_runs(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from learner import Learner

    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {"learn": Learner(**tiny)}
    exec(block("seeing-inside-training"), scope)
    assert "before_fit" in capsys.readouterr().out
    assert len(scope["stats"].means[0]) == 2  # the ReLU, at each of the 2 training batches
    for name in ("history.csv", "stats.png", "color_dim.png", "dead.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_feature_examples_run(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from learner import Learner, accuracy

    monkeypatch.chdir(tmp_path)
    learn = Learner(**tiny, metrics=accuracy)
    scope: dict[str, Any] = {"learn": learn, "dls": tiny["dls"]}
    for name in ("lr-find", "schedules", "torch-schedulers", "trackers"):
        exec(block(name), scope)
    assert (tmp_path / "lr_find.png").exists() and (tmp_path / "lr.png").exists()
    assert scope["result"].suggestion is not None
    assert (tmp_path / "models" / "best.pt").exists()
    # 3 one-cycle + 3 scheduled + 3 + 3 torch-scheduled epochs, then at least 3 more
    assert len(learn.recorder.history) >= 12 + 3


def test_checkpoint_and_predictions_examples_run(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from learner import Learner

    monkeypatch.chdir(tmp_path)
    learn = Learner(**tiny)
    exec(block("checkpoints"), {"learn": learn})
    assert len(learn.recorder.losses) == 6  # 3 epochs of 2 batches, resumed: none added
    assert (tmp_path / "models" / "ckpt.pt").exists() and (
        tmp_path / "models" / "ckpt.1.pt"
    ).exists()
    x_valid = torch.cat([x for x, _ in tiny["dls"].valid])
    scope: dict[str, Any] = {"learn": learn, "x_valid": x_valid}
    exec(block("predictions"), scope)
    assert scope["losses"].shape == (8,)


def test_batches_page_runs() -> None:
    import torch

    torch.manual_seed(0)
    scope: dict[str, Any] = {}
    exec(block("batch-formats"), scope)
    assert scope["learn"].infer((scope["x"][0], scope["extra"][0])).shape == (3,)
    image, label = scope["fmt"].split({"image": scope["x"][:4], "label": scope["y"][:4]})
    assert image[0].shape == (4, 8) and label[0].shape == (4,)
    exec(block("several-outputs"), scope)
    assert scope["logits"].shape == (64, 3) and scope["aux"].shape == (64,)
    assert scope["one_logits"].shape == (3,) and scope["one_aux"].shape == ()
    assert "first_accuracy" in scope["learn"].recorder.history[-1]
    exec(block("no-targets"), scope)
    row = scope["learn"].recorder.history[-1]
    assert {"train_code_norm", "valid_code_norm"} <= set(row) and scope["recon"].shape == (64, 8)
    exec(block("gan"), scope)
    row = scope["learn"].recorder.history[-1]
    assert {"train_g_loss", "train_d_loss", "valid_g_loss", "valid_d_loss"} <= set(row)
    assert list(scope["learn"].opt) == ["g", "d"]


def test_steps_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import torch

    monkeypatch.chdir(tmp_path)  # the page writes run/ckpt.pt
    torch.manual_seed(0)
    scope: dict[str, Any] = {}
    exec(block("stream"), scope)
    learn = scope["learn"]
    assert learn.global_step == 60 and len(learn.recorder.losses) == 120
    assert [row["step"] for row in learn.recorder.history] == [20, 40, 60]
    assert "60 [20, 40, 60]" in capsys.readouterr().out
    scope = {}
    exec(block("resume-at-a-step"), scope)
    assert scope["resumed"].global_step == 12
    assert capsys.readouterr().out.strip().endswith("12 True")
