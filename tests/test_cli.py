"""The ``lsx`` command: parity, identify (on the zoo of hand-written losses), explain, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lsx import spec
from lsx.cli import _identify, _parity, main

pytest.importorskip("rich")
torch = pytest.importorskip("torch")

ZOO = os.path.join(os.path.dirname(__file__), "identify_zoo.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json(capsys, argv):
    code = main(argv)
    out = capsys.readouterr().out
    return code, json.loads(out)


# --------------------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------------------
def test_parity_json_numpy_and_torch(capsys):
    code, report = run_json(capsys, ["parity", "--backends", "numpy,torch", "--json", "--quick", "--jobs", "1"])
    assert code == 0, [c for c in report["checks"] if not c["ok"]]
    assert report["ok"] is True
    assert set(report["backends"]) == {"numpy", "torch"}
    assert report["backends"]["torch"]["status"] == "ok" and report["backends"]["torch"]["version"]
    cases = {c["id"] for c in report["cases"]}
    assert {"ce", "weight", "ignore", "probs", "fairseq", "t5x"} <= cases
    checks = report["checks"]
    assert len(checks) == 2 * len(_parity.CASES) * 2  # two backends, two dtypes, eager only (--quick)
    for check in checks:
        assert check["ok"] and check["error"] is None
        assert check["loss_abs"] <= _parity.TOLERANCE[check["dtype"]] * 10 + check["tolerance"]
    # torch's F.cross_entropy is compared where it expresses the case, never where it cannot
    torch_builtin = {c["case"] for c in checks if c["backend"] == "torch" and c["builtin"]}
    assert {"ce", "eps", "weight", "ignore", "probs"} <= torch_builtin
    assert not torch_builtin & {"others", "fairseq", "t5x"}


class _OffByEps(_parity.NumpyRunner):
    """A deliberately wrong backend: smoothing spread over K−1 where the case asks for K."""

    name = "broken"

    def eager(self, data):
        options = dict(data.options)
        if options.get("label_smoothing") and "spread" not in options and "convention" not in options:
            options["spread"] = "others"
        value, grad = self.module.loss_and_grad(data.logits.astype(data.dtype), data.target, axis=data.axis, **options)
        return np.asarray(value, np.float64), np.asarray(grad, np.float64)


def test_parity_fails_on_a_wrong_backend(capsys, monkeypatch):
    monkeypatch.setitem(_parity.BACKENDS, "broken", _OffByEps)
    code, report = run_json(capsys, ["parity", "--backends", "numpy,broken", "--json"])
    assert code == 1 and report["ok"] is False
    assert report["backends"]["numpy"]["status"] == "ok"
    assert report["backends"]["broken"]["status"] == "mismatch"
    failed = {c["case"] for c in report["checks"] if not c["ok"]}
    assert "eps" in failed and "ce" not in failed and "others" not in failed
    # the table marks it too
    assert main(["parity", "--backends", "broken", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "checks failed" in out


class _Missing(_parity.Runner):
    name, extra = "missing", "missing"

    def setup(self):
        raise ImportError("lsx.missing needs a framework that is not installed")


def test_parity_lists_missing_frameworks(capsys, monkeypatch):
    monkeypatch.setitem(_parity.BACKENDS, "missing", _Missing)
    code, report = run_json(capsys, ["parity", "--backends", "numpy,missing", "--json", "--quick"])
    assert report["backends"]["missing"]["status"] == "not installed"
    assert report["backends"]["missing"]["install"] == "pip install 'lsx[missing]'"
    assert report["ok"] is True and code == 1  # asked for by name: a missing backend fails the run
    assert main(["parity", "--backends", "missing", "--quick"]) == 1
    assert "pip install 'lsx[missing]'" in capsys.readouterr().out


def test_parity_bad_backend_name(capsys):
    assert main(["parity", "--backends", "numpy,pytorch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lsx: error: unknown backend(s) pytorch") and "Traceback" not in err


def test_compare_flags_nan_pattern_and_shape():
    assert _parity.compare(np.array([1.0, np.nan]), np.array([1.0, 1.0]))[0] == np.inf
    assert _parity.compare(np.ones(3), np.ones(2))[0] == np.inf
    err, rel, scale = _parity.compare(np.array([2.0, 4.0 + 1e-6]), np.array([2.0, 4.0]))
    assert err == pytest.approx(1e-6) and rel == pytest.approx(2.5e-7) and scale == 4.0


@pytest.mark.slow
def test_parity_every_installed_backend_in_workers(capsys):
    code, report = run_json(capsys, ["parity", "--json", "--jobs", "2"])
    assert code == 0, [c for c in report["checks"] if not c["ok"]]
    installed = [n for n, b in report["backends"].items() if b["status"] == "ok"]
    assert "numpy" in installed and "torch" in installed
    assert {c["mode"] for c in report["checks"] if c["backend"] == "torch"} == {"eager", "compiled"}


# --------------------------------------------------------------------------------------------------------
# identify
# --------------------------------------------------------------------------------------------------------
def identify(name, *extra):
    fn, _ = _identify.load(f"{ZOO}:{name}")
    return _identify.identify(fn, framework=extra[0] if extra else None)


def assert_same_as_reference(result, name):
    """The inferred options reproduce the callable on fresh inputs (independent of the probes)."""
    fn, _ = _identify.load(f"{ZOO}:{name}")
    rng = np.random.default_rng(123)
    k = len(result.options.get("weight") or []) or 6
    x = rng.normal(size=(7, k))
    y = rng.integers(0, k, size=7)
    if result.options.get("ignore_index") is not None and result.options["ignore_index"] < k:
        y[y == result.options["ignore_index"]] = (result.options["ignore_index"] + 1) % k
    options = dict(result.options)
    if options.get("weight") is not None:
        options["weight"] = np.asarray(options["weight"])
    caller = _identify.make_caller(fn, result.framework)
    np.testing.assert_allclose(caller(x, y), spec.reference_loss(x, y, **options), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "name, expected, conventions",
    [
        (
            "torch_builtin",
            dict(label_smoothing=0.1, spread="all", reduction="mean", ignore_index=-100),
            {"torch", "hf"},
        ),
        ("KDistSmoothing", dict(label_smoothing=0.1, spread="all", reduction="mean", ignore_index=None), {"timm"}),
        ("fairseq_style", dict(label_smoothing=0.1, spread="others", reduction="sum", ignore_index=1), {"fairseq"}),
        ("summed", dict(label_smoothing=0.1, spread="all", reduction="sum", ignore_index=-100), set()),
        ("per_element", dict(label_smoothing=0.2, reduction="none", ignore_index=-100), set()),
        ("KLForm", dict(label_smoothing=0.1, spread="others", normalize=True, reduction="mean"), set()),
        ("HFLabelSmoother", dict(spread="all", reduction="mean", ignore_index=-100), {"hf"}),
    ],
)
def test_identify_exact_matches(name, expected, conventions):
    result = identify(name)
    assert result.verdict == "exact" and result.matches, [f.text for f in result.findings]
    for option, value in expected.items():
        assert (
            result.options[option] == pytest.approx(value)
            if isinstance(value, float)
            else result.options[option] == value
        )
    assert result.options["label_smoothing"] == pytest.approx(expected.get("label_smoothing", 0.1), abs=1e-6)
    assert conventions <= set(result.conventions)
    assert result.framework == "torch" and result.deviation < 1e-5
    assert_same_as_reference(result, name)


def test_identify_weights_on_every_term():
    result = identify("WeightedEverywhere")
    assert result.verdict == "exact"
    w = np.asarray(result.options["weight"])
    np.testing.assert_allclose(w / w[0], [1.0, 2.0, 0.5, 1.5, 1.0], rtol=1e-5)
    assert result.options["reduction"] == "mean" and result.options["label_smoothing"] == pytest.approx(0.1)
    assert_same_as_reference(result, "WeightedEverywhere")


def test_identify_weights_only_on_nll():
    result = identify("WeightedNllOnly")
    assert result.verdict == "differs" and not result.matches
    weights = [f for f in result.findings if f.topic == "weights"]
    assert weights and not weights[0].ok and "only the target (NLL) term" in weights[0].text
    assert result.deviation > 1e-3


def test_identify_mean_over_all_rows():
    result = identify("mean_over_all_rows")
    assert result.verdict == "valid labels only"
    ignore = next(f for f in result.findings if f.topic == "ignore")
    assert not ignore.ok and "denominator" in ignore.text and "×1.2" in ignore.text  # K=5 rows + 1 ignored
    assert result.options["ignore_index"] == -100 and result.options["label_smoothing"] == pytest.approx(0.1)


def test_identify_smoothing_left_on_padding():
    result = identify("smoothing_on_padding_too")
    assert result.verdict == "valid labels only"
    ignore = next(f for f in result.findings if f.topic == "ignore")
    assert "still get the smoothing term" in ignore.text
    assert result.options["ignore_index"] is None  # lsx can only give them loss 0


def test_identify_z_loss():
    result = identify("with_z_loss")
    assert result.options["z_loss"] == pytest.approx(1e-3, rel=1e-5)
    assert result.options["label_smoothing"] == pytest.approx(0.1)
    assert result.verdict == "valid labels only"  # the z-loss is also taken on ignored rows
    assert any("z-loss" in f.text and not f.ok for f in result.findings if f.topic == "ignore")


def test_identify_wrong_smoothing_on_probabilities():
    result = identify("smoothing_on_probs")
    assert result.verdict == "differs" and result.deviation > 1e-2


def test_identify_eps_over_k_slip():
    result = identify("eps_over_k_slip")
    assert result.verdict == "differs"
    text = " ".join(f.text for f in result.findings if not f.ok)
    assert "neither ε/K nor ε/(K−1)" in text and "sums to 0.98" in text


def test_identify_jax_optax():
    pytest.importorskip("optax")
    result = identify("optax_style")
    assert result.framework == "jax"
    assert result.options["label_smoothing"] == pytest.approx(0.2) and result.options["spread"] == "all"
    assert result.options["reduction"] == "mean"
    assert result.verdict == "valid labels only"  # one_hot(-100) is all zeros: the smoothing term remains


def test_identify_numpy_t5x():
    result = identify("t5x_style")
    assert result.framework == "numpy"
    expected = spec.resolve_options("t5x", label_smoothing=0.1)
    assert result.options["spread"] == expected.spread and result.options["normalize"] is True
    assert result.options["z_loss"] == pytest.approx(expected.z_loss) and result.options["reduction"] == "sum"
    assert result.options["label_smoothing"] == pytest.approx(0.1)
    wrap = [f for f in result.findings if "wraps" in f.text]
    assert wrap and wrap[0].scope == "ignored"  # NumPy indexing takes -1 as the last class
    assert result.verdict == "valid labels only"


def test_identify_command_output(capsys):
    assert main(["identify", f"{ZOO}:fairseq_style"]) == 0
    out = capsys.readouterr().out
    assert "lsx.torch.loss(logits, labels, label_smoothing=0.1, spread='others'" in out
    assert "fairseq" in out and "exactly" in out
    code, data = run_json(capsys, ["identify", f"{ZOO}:KDistSmoothing", "--json"])
    assert code == 0 and data["verdict"] == "exact" and data["options"]["ignore_index"] is None


@pytest.mark.parametrize(
    "target, message",
    [
        ("nowhere.py:f", "no such file"),
        (f"{ZOO}", "expected FILE.py:NAME"),
        (f"{ZOO}:no_such_loss", "has no 'no_such_loss'"),
        (f"{ZOO}:NOT_CALLABLE", "not a function or callable class"),
        (f"{ZOO}:NeedsArguments", "cannot instantiate NeedsArguments() with no arguments"),
        (f"{ZOO}:raises", "RuntimeError: boom"),
        (f"{ZOO}:wrong_shape", "shape (5, 2)"),
    ],
)
def test_identify_errors(capsys, target, message):
    assert main(["identify", target]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lsx: error:") and message in err and "Traceback" not in err
    assert err.count("\n") == 1


# --------------------------------------------------------------------------------------------------------
# explain, the entry points
# --------------------------------------------------------------------------------------------------------
def test_explain_convention_and_options(capsys):
    assert main(["explain", "--convention", "fairseq", "--label-smoothing", "0.1", "-K", "5"]) == 0
    out = capsys.readouterr().out
    assert "spread='others'" in out and "ignore_index=1" in out and "reduction='sum'" in out
    a, b = spec.smoothing_coefficients(spec.resolve_options("fairseq", label_smoothing=0.1), 5)
    assert f"q_y = {a + b:.6g}, q_c = {b:.6g}" in out
    for name in spec.CONVENTIONS:
        assert f"  {name} " in out
    assert main(["explain", "--z-loss", "0.001", "--normalize", "--ignore-index", "none"]) == 0
    out = capsys.readouterr().out
    assert "0.001·w_y·LSE²" in out and "KL form" in out and "ignore_index=None" in out


def test_explain_rejects_bad_options(capsys):
    assert main(["explain", "--label-smoothing", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lsx: error: label_smoothing must be in [0, 1]") and "Traceback" not in err


def test_python_dash_m(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "lsx", "explain", "--convention", "torch"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and "loss_i = Σ_c w_c q_c (LSE − x_c)" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "lsx", "identify", "missing.py:f"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 2 and done.stderr.strip() == "lsx: error: no such file: missing.py"


def test_import_lsx_cli_loads_no_framework():
    code = "import sys, lsx.cli, lsx.cli._parity, lsx.cli._identify; print(sorted(m for m in ('torch','jax','tensorflow','keras') if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT)
    )
    assert done.stdout.strip() == "[]", done.stderr
