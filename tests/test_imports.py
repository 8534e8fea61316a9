"""What importing graphrt does to the importing process: from the checkout's root, where
``python -m`` and pytest put the root first on ``sys.path``, no folder of the checkout shadows an
installed package (Hugging Face's ``kernels``, which transformers imports, above all); and the
server's API processes and ``import graphrt`` load neither torch nor the engine."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str, **env: str) -> str:
    """Run ``python -c code`` in the checkout's root, as `python -m graphrt` and `python -m
    pytest` run there; returns stdout, and fails with stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _top_level_folders() -> list[str]:
    folders = (p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier())
    # graphrt itself is meant to be found in the checkout; dunder folders are caches.
    return sorted(n for n in folders if n != "graphrt" and not n.startswith("_"))


def test_checkout_folders_do_not_shadow_installed_packages(tmp_path: Path) -> None:
    """An installed package named like a top-level folder of the checkout (``kernels``,
    ``capture``, ...) is what ``import name`` finds from the root; graphrt's own subpackages
    still come from the checkout."""
    site = tmp_path / "site"
    folders = _top_level_folders()
    assert {"kernels", "capture"} <= set(folders)
    for name in folders:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"INSTALLED = {name!r}\n")
    out = _run_from_root(
        f"""
        import importlib, json
        import graphrt.kernels.reference, graphrt.capture.buckets
        found = {{n: getattr(importlib.import_module(n), "INSTALLED", None) for n in {folders!r}}}
        print(json.dumps([found, graphrt.kernels.reference.__file__,
                          graphrt.capture.buckets.__file__]))
        """,
        PYTHONPATH=str(site),  # after the root on sys.path, like site-packages
    )
    found, reference, buckets = json.loads(out)
    assert found == {name: name for name in folders}
    assert Path(reference) == ROOT / "kernels" / "reference.py"
    assert Path(buckets) == ROOT / "capture" / "buckets.py"


def test_installed_distributions_resolve_outside_the_checkout() -> None:
    """Every top-level folder name of the checkout that an installed distribution provides
    (Hugging Face's ``kernels``, when transformers pulled it in) resolves to the installed
    package, not to the checkout's folder."""
    names = set(_top_level_folders()) & set(importlib.metadata.packages_distributions())
    out = _run_from_root(
        f"""
        import importlib.util, json
        specs = {{n: importlib.util.find_spec(n) for n in {sorted(names)!r}}}
        print(json.dumps({{n: [s.origin, list(s.submodule_search_locations or [])]
                          for n, s in specs.items()}}))
        """
    )
    for name, (origin, locations) in json.loads(out).items():
        for path in [origin, *locations]:
            # Not the checkout's folder (a virtualenv inside the checkout, as CI's, is fine).
            if path:
                assert not Path(path).resolve().is_relative_to(ROOT / name), (name, path)


def test_script_modules_do_not_shadow_installed_packages() -> None:
    """``python benchmarks/x.py`` puts ``benchmarks/`` first on ``sys.path``, and pytest puts
    ``tests/`` there: no module in either may be named like an installed package
    (``benchmarks/kernels.py`` was, and transformers 5.25 imported it instead of HF's)."""
    installed = set(importlib.metadata.packages_distributions())
    for folder in ("benchmarks", "tests"):
        clash = sorted(p.name for p in (ROOT / folder).glob("*.py") if p.stem in installed)
        assert not clash, f"{folder}/ shadows installed packages: {clash}"


def test_transformers_imports_hugging_face_kernels_from_the_root() -> None:
    """The break of 2026-12-06: transformers 5.25 imports ``kernels`` (Hugging Face's), and
    the checkout's ``kernels/`` folder used to answer."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    out = _run_from_root(
        """
        import graphrt, graphrt.kernels.ops
        import transformers.activations, kernels
        print(kernels.__file__)
        """
    )
    assert not Path(out.strip()).resolve().is_relative_to(ROOT / "kernels")


def test_api_process_modules_load_neither_torch_nor_the_engine() -> None:
    out = _run_from_root(
        """
        import json, sys
        import graphrt
        from graphrt import EngineConfig, SamplingParams, RequestRejected
        import graphrt.serve.api_servers, graphrt.serve.app, graphrt.serve.cli
        import graphrt.serve.engine_client, graphrt.serve.openai_api
        print(json.dumps(sorted(m for m in ("torch", "graphrt.engine", "graphrt.runner")
                                if m in sys.modules)))
        """
    )
    assert json.loads(out) == []


def test_public_names_resolve_lazily() -> None:
    import graphrt

    assert sorted(graphrt.__all__) == sorted(graphrt._EXPORTS)
    for name in graphrt.__all__:
        assert getattr(graphrt, name).__name__ == name
        assert name in dir(graphrt)
    with pytest.raises(AttributeError, match="no_such_name"):
        graphrt.no_such_name  # noqa: B018


@pytest.mark.default_model
def test_api_process_tokenizes_without_torch(default_model_dir: Path) -> None:
    """What an API process does with its tokenizer (encode, chat template, decode), after
    ``keep_torch_out``: transformers must work without torch."""
    out = _run_from_root(
        f"""
        import json, sys
        from graphrt.serve.cli import keep_torch_out
        keep_torch_out()
        from graphrt.tokenizer import Tokenizer
        tok = Tokenizer.from_pretrained({str(default_model_dir)!r})
        ids = tok.encode("Hello world")
        chat = tok.hf.apply_chat_template(
            [{{"role": "user", "content": "Hi"}}], tokenize=False, add_generation_prompt=True
        )
        print(json.dumps([tok.decode(ids), chat, sys.modules.get("torch") is not None]))
        """
    )
    text, chat, torch_loaded = json.loads(out)
    assert text == "Hello world" and "Hi" in chat
    assert not torch_loaded
