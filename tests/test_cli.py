"""The ``lsx`` command: parity, identify (on the zoo of hand-written losses), explain, errors."""

from __future__ import annotations

import json
import math
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
    assert {"ce", "eps", "weight", "ignore", "probs", "denominator"} <= torch_builtin
    assert not torch_builtin & {"others", "fairseq", "t5x", *NO_BUILTIN}


def test_parity_quick_names_what_runs(capsys, monkeypatch):
    """--quick compiles nothing, so the table does not name a compiler; off a terminal it is not cut."""
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(["parity", "--backends", "numpy,torch", "--quick", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch.compile" not in out and "jax.jit" not in out
    assert "eager only (--quick: nothing compiled)" in out
    assert "weight-ignore-sum" in out and "…" not in out  # the full width, not 80 columns
    code, report = run_json(capsys, ["parity", "--backends", "torch", "--json", "--quick", "--jobs", "1"])
    assert code == 0
    assert report["backends"]["torch"]["compiler"] is None


def test_parity_names_the_torch_compile_backend():
    assert _parity.TorchRunner().compiler == "torch.compile(backend='aot_eager')"


@pytest.mark.parametrize(
    "argv",
    [
        ["explain", "--convention", "t5x", "--label-smoothing", "0.1", "-K", "5"],
        ["identify", f"{ZOO}:summed", "--json"],
        ["identify", f"{ZOO}:summed"],
        ["parity", "--backends", "numpy", "--quick", "--json", "--jobs", "1"],
    ],
)
def test_closed_stdout_exits_quietly(argv):
    """``lsx … | head``: the reader goes away before lsx writes; no traceback, exit 141 (SIGPIPE) or 0."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lsx", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    proc.stdout.close()  # the reader is gone before anything is written
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode in (0, 141), err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


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


#: the parity cases no built-in expresses: soft-capping, per-element weights, a zero denominator
NO_BUILTIN = {"softcap", "softcap-mask", "sample-weight", "denominator-0", "t5x-capped-weighted"}
NEW_OPTIONS = {"softcap", "sample_weight", "denominator", "class_mask"}


class _Forgets(_parity.Runner):
    """The float64 reference run without one option: a backend that drops it (or, for class_mask, lets the
    padding lanes into the softmax)."""

    name, extra, modes = "forgets", "forgets", ("eager",)
    option = ""

    def setup(self):
        return "reference"

    def eager(self, data):
        options = {n: v for n, v in data.options.items() if n != self.option}
        loss = spec.reference_loss(data.logits, data.target, axis=data.axis, **options)
        grad = spec.reference_grad(data.logits, data.target, axis=data.axis, **options)
        return loss, grad


@pytest.mark.parametrize(
    "option, caught",
    [
        ("softcap", {"softcap", "softcap-mask", "t5x-capped-weighted"}),
        ("sample_weight", {"sample-weight", "t5x-capped-weighted"}),
        ("denominator", {"denominator", "denominator-0", "t5x-capped-weighted"}),
        ("class_mask", {"softcap-mask"}),
    ],
)
def test_parity_cases_catch_a_dropped_option(monkeypatch, option, caught):
    """Each new option has a case that fails when a backend ignores it, and only those cases fail."""
    monkeypatch.setitem(_parity.BACKENDS, "forgets", type("Forgets", (_Forgets,), {"option": option}))
    report = _parity.run(["forgets"], matrix="quick")
    failed = {c.case for c in report.checks if not c.ok}
    assert failed == caught
    assert {c.dtype for c in report.checks if not c.ok} == {"float64", "float32"}


def test_parity_new_cases_hold_what_they_test():
    """softcap bites (logits beyond the cap), padding lanes would win the softmax after capping, sample weights
    include zeros on kept and ignored rows, the denominators differ from the local one."""
    cases = {c.id: c for c in _parity.CASES}
    x, _, options = cases["softcap"].make()
    assert np.abs(x).max() > 2 * options["softcap"]
    x, y, options = cases["softcap-mask"].make()
    mask = options["class_mask"]
    assert not mask.all() and (x[:, ~mask] > x[:, mask].max()).all() and mask[y].all()
    _, y, options = cases["sample-weight"].make()
    sw, ignored = options["sample_weight"], y == -100
    assert sw.shape == y.shape and (sw[~ignored] == 0).any() and (sw[~ignored] > 0).any() and ignored.any()
    assert options["weight"].shape == (5,)
    for name in ("denominator", "t5x-capped-weighted"):
        data = _parity.make_data(cases[name], "float64")
        local = dict(data.options, denominator=None, reduction="mean")
        assert not np.isclose(data.loss, spec.reference_loss(data.logits, data.target, **local))
    data = _parity.make_data(cases["denominator-0"], "float64")
    assert data.loss == 0 and not data.grad.any() and (data.target != -100).any()


def test_parity_builtins_express_the_denominator_only():
    """F.cross_entropy's (and optax's) sum ÷ the denominator is the reference's mean; soft-capping and
    per-element weights are compared with no built-in."""
    runners = [_parity.TorchRunner()]
    try:
        import optax  # noqa: F401

        runners.append(_parity.JaxRunner())
    except ImportError:
        pass
    for runner in runners:
        runner.setup()
        for case in _parity.CASES:
            if not NEW_OPTIONS & set(case.options):
                continue
            for dtype in _parity.DTYPES:
                data = _parity.make_data(case, dtype)
                found = runner.builtin(data)
                if case.id in NO_BUILTIN:
                    assert found is None, (runner.name, case.id)
                    continue
                assert found is not None, (runner.name, case.id)
                _, (value, grad) = found
                tol = _parity.TOLERANCE[dtype] * _parity.BUILTIN_FACTOR
                np.testing.assert_allclose(value, data.loss, rtol=0, atol=tol)
                np.testing.assert_allclose(grad, data.grad, rtol=0, atol=tol)


class _Older(_parity.NumpyRunner):
    """A backend whose ``loss`` predates softcap, sample_weight and denominator."""

    name = "older"

    def setup(self):
        version = super().setup()  # runs lsx.numpy.loss_and_grad; ``fn`` is the signature parity reads

        def loss(
            logits,
            target,
            *,
            axis=-1,
            label_smoothing=0.0,
            spread="all",
            weight=None,
            ignore_index=-100,
            z_loss=0.0,
            normalize=False,
            class_mask=None,
            reduction="mean",
            empty_mean="nan",
            convention=None,
        ):
            raise AssertionError("not called")

        self.fn = loss
        return version


def test_parity_leaves_out_cases_a_backend_cannot_take(capsys, monkeypatch):
    """A backend whose loss lacks an option is not run on its cases, and the report names the options."""
    monkeypatch.setitem(_parity.BACKENDS, "older", _Older)
    code, report = run_json(capsys, ["parity", "--backends", "older", "--json", "--quick"])
    assert code == 0 and report["ok"] is True
    ran = {c["case"] for c in report["checks"]}
    assert ran and not ran & {"softcap", "softcap-mask", "sample-weight", "denominator", "denominator-0"}
    assert {"ce", "t5x", "3d-axis1"} <= ran
    message = report["backends"]["older"]["message"]
    assert message == "not run: cases with denominator, sample_weight, softcap (this backend does not take them yet)"
    assert main(["parity", "--backends", "older", "--quick"]) == 0
    assert "older: not run: cases with denominator, sample_weight, softcap" in capsys.readouterr().out


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
            {"hf"},  # "torch" needs label_smoothing=0.1 added
        ),
        ("KDistSmoothing", dict(label_smoothing=0.1, spread="all", reduction="mean", ignore_index=None), {"timm"}),
        ("fairseq_style", dict(label_smoothing=0.1, spread="others", reduction="sum", ignore_index=1), set()),
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
    assert set(result.conventions) == conventions
    if name == "fairseq_style":  # fairseq's preset leaves ε at 0
        assert result.convention_options == {"fairseq": {"label_smoothing": 0.1}}
    assert result.framework == "torch" and result.deviation < 1e-5
    assert_same_as_reference(result, name)


ZOO_LOSSES = [
    "torch_builtin",
    "KDistSmoothing",
    "fairseq_style",
    "WeightedNllOnly",
    "WeightedEverywhere",
    "mean_over_all_rows",
    "smoothing_on_padding_too",
    "summed",
    "per_element",
    "KLForm",
    "with_z_loss",
    "smoothing_on_probs",
    "eps_over_k_slip",
    "HFLabelSmoother",
    "LabelSmoothingLoss",
    "SmoothingDefaultsToZero",
    "optax_style",
    "t5x_style",
]


def test_zoo_list_is_complete():
    import inspect

    fn, _ = _identify.load(f"{ZOO}:torch_builtin")
    module = sys.modules[fn.__module__]
    losses = {
        name
        for name, value in vars(module).items()
        if (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module.__name__
        and name not in ("NeedsArguments", "raises", "wrong_shape", "returns_none", "returns_tuple")
    }
    assert losses == set(ZOO_LOSSES)


def _outcome(call):
    """A loss as an array, or "raises"."""
    try:
        return np.asarray(call(), dtype=np.float64)
    except (_identify.CallError, ValueError):
        return "raises"


def _same(a, b):
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("name", ZOO_LOSSES)
def test_identify_names_only_conventions_that_reproduce_it(name):
    """A convention is named only if ``convention=that`` (plus the options printed with it) gives the callable's
    loss, and every convention that does alone is named: checked on fresh inputs (random, an empty batch, an
    all-ignored one, labels it rejects), none of them the probes'."""
    if name == "optax_style":
        pytest.importorskip("optax")
    fn, _ = _identify.load(f"{ZOO}:{name}")
    result = _identify.identify(fn)
    claimed = {c: {} for c in result.conventions} | result.convention_options
    if not result.matches:
        assert claimed == {}
        return
    assert claimed, f"{name}: some convention reproduces every exact match, with options added"
    assert not (result.conventions and result.convention_options)  # alone, or else the fewest additions
    caller = _identify.make_caller(fn, result.framework)
    k = len(result.options.get("weight") or []) or 6
    rng = np.random.default_rng(2024)
    ignore = result.options.get("ignore_index")
    batches = [(rng.normal(size=(9, k)), rng.integers(0, k, size=9)), (np.zeros((0, k)), np.zeros(0, np.int64))]
    if ignore is not None:
        y = rng.integers(0, k, size=9)
        y[::3] = ignore
        batches += [(rng.normal(size=(9, k)), y), (rng.normal(size=(3, k)), np.full(3, ignore))]
    else:
        batches += [(rng.normal(size=(3, k)), np.array([0, label, 1])) for label in (-100, -1)]
    theirs = [_outcome(lambda x=x, y=y: caller(x, y)) for x, y in batches]
    for convention in spec.CONVENTIONS:
        extra = {n: np.asarray(v) if n == "weight" else v for n, v in claimed.get(convention, {}).items()}
        ours = [
            _outcome(lambda x=x, y=y, c=convention, e=extra: spec.reference_loss(x, y, convention=c, **e))
            for x, y in batches
        ]
        agree = all(_same(a, b) for a, b in zip(theirs, ours))
        if convention in claimed:
            assert agree, f"{name}: convention={convention!r} {extra} is named but differs: {theirs} vs {ours}"
        elif convention not in result.convention_options:
            assert not agree, f"{name}: convention={convention!r} alone reproduces it but is not named"


def test_identify_zero_smoothing_class():
    """ε defaults to 0: the plain torch mean (NaN for an empty batch) is the torch convention, not keras (0 for
    an empty batch, no ignore index) nor timm/hf (ε = 0.1); the hint says how to reveal the spread."""
    result = identify("SmoothingDefaultsToZero")
    assert result.verdict == "exact" and result.options["label_smoothing"] == 0.0
    assert result.conventions == ["torch"] and result.convention_options == {}
    assert result.options.get("empty_mean", "nan") == "nan"
    smoothing = next(f for f in result.findings if f.topic == "smoothing")
    assert "ε = 0" in smoothing.text and "--init 'smoothing=0.1'" in smoothing.text
    revealed = _identify.identify(_identify.load(f"{ZOO}:SmoothingDefaultsToZero", init="smoothing=0.1")[0])
    assert revealed.verdict == "exact" and revealed.options["label_smoothing"] == pytest.approx(0.1)
    assert revealed.options["spread"] == "all" and revealed.conventions == ["hf"]


def test_identify_command_prints_conventions(capsys):
    assert main(["identify", f"{ZOO}:SmoothingDefaultsToZero"]) == 0
    out = capsys.readouterr().out
    assert "the same as convention(s) torch, alone: e.g. lsx.torch.loss(logits, labels, convention='torch')" in out
    assert "keras" not in out and "timm" not in out
    assert main(["identify", f"{ZOO}:fairseq_style"]) == 0
    out = capsys.readouterr().out
    assert "no convention alone reproduces it; with options added:" in out
    assert "lsx.torch.loss(logits, labels, convention='fairseq', label_smoothing=0.1)" in out


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


def test_identify_verdict_says_where_it_differs(capsys):
    """The text verdict is complete: the closest call, what differs, and on which labels and rows."""
    assert main(["identify", f"{ZOO}:mean_over_all_rows"]) == 0
    out = capsys.readouterr().out
    verdict = out[out.index("verdict:") :]
    assert "lsx.torch.loss(logits, labels, label_smoothing=0.1" in verdict
    assert "differs: label -100 is ignored: loss 0, but changes the mean's denominator" in verdict
    where = [line for line in verdict.splitlines() if line.strip().startswith("where:")]
    assert where and "have label -100" in where[0] and "rows 0, " in where[0]
    code, data = run_json(capsys, ["identify", f"{ZOO}:mean_over_all_rows", "--json"])
    assert code == 0
    assert data["where"] == [w.strip()[len("where: ") :] for w in where]


def test_identify_deviation_counts_whole_elements():
    """A loss that differs only in how label −1 wraps: the check with label −1 elements shows it, in units of one
    element's loss, not ~1e-16 relative to a sum."""
    result = identify("t5x_style")
    assert result.verdict == "valid labels only" and result.valid_deviation < 1e-12
    wrapped = [c for c in result.checks if c.get("label") == -1]
    assert wrapped and wrapped[0]["rows"] and wrapped[0]["deviation"] > 0.5
    assert result.deviation == wrapped[0]["deviation"]
    where = _identify.where_it_differs(result)
    assert len(where) == 1 and "have label -1" in where[0] and "compared with those elements ignored" in where[0]


def test_identify_deviation_of_one_element_in_a_summed_loss():
    """The measure: one element computed differently counts ~1 whatever the batch size (per-element scale)."""
    prober = _identify.Prober(_identify.make_caller(_identify.load(f"{ZOO}:summed")[0], "torch"))
    options = dict(label_smoothing=0.1, spread="all", ignore_index=-100, z_loss=0.0, reduction="sum")
    exact = _identify._verify(prober, options, [-100], [5, 7])
    assert max(c["deviation"] for c in exact) < 1e-12
    # lsx with ε = 0.2: every element differs by a fraction of its loss, so the deviation is O(N·0.1), not O(0.1/N)
    off = _identify._verify(prober, dict(options, label_smoothing=0.2), [-100], [5, 7])
    assert min(c["deviation"] for c in off) > 0.05


def test_identify_constructor_arguments_inferred():
    """LabelSmoothingLoss(classes, smoothing): the class count is the probe's K, ε a reported probe value."""
    fn, label = _identify.load(f"{ZOO}:LabelSmoothingLoss")
    assert label == "identify_zoo.py:LabelSmoothingLoss(smoothing=0.1, classes=K)"
    result = _identify.identify(fn)
    assert result.verdict == "exact", [f.text for f in result.findings]
    assert result.options["spread"] == "others" and result.options["label_smoothing"] == 0.1
    assert result.options["reduction"] == "mean" and result.options["ignore_index"] is None
    notes = [f.text for f in result.findings if f.topic == "constructor"]
    assert any("classes = the probe's class count K" in n for n in notes)
    assert any("smoothing=0.1 is a probe value" in n for n in notes)


def test_identify_init_arguments(capsys):
    code, data = run_json(capsys, ["identify", f"{ZOO}:LabelSmoothingLoss", "--init", "smoothing=0.25", "--json"])
    assert code == 0 and data["verdict"] == "exact" and data["options"]["label_smoothing"] == 0.25
    assert data["name"] == "identify_zoo.py:LabelSmoothingLoss(smoothing=0.25, classes=K)"
    assert not any("probe value" in f["text"] for f in data["findings"])
    assert _identify.parse_init("classes=5, smoothing=0.1, dims=(1, 2)") == {
        "classes": 5,
        "smoothing": 0.1,
        "dims": (1, 2),
    }
    assert _identify.parse_init("") == {}


@pytest.mark.parametrize(
    "init, message",
    [
        ("smoothing=__import__('os').getcwd()", "must be a literal"),
        ("0.1", "keyword arguments only"),
        ("**{'smoothing': 0.1}", "keyword arguments only"),
        ("smoothing=", "must be keyword arguments"),
        ("margin=1", "takes no argument margin"),
    ],
)
def test_identify_init_errors(capsys, init, message):
    assert main(["identify", f"{ZOO}:LabelSmoothingLoss", "--init", init]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lsx: error:") and message in err and "Traceback" not in err


def test_identify_rounds_to_the_probe_precision():
    """HF's LabelSmoother sums in float32: the probes read ε = 0.0999997, which is 0.1 at that precision."""
    result = identify("HFLabelSmoother")
    assert result.options["label_smoothing"] == 0.1
    assert result.call == "lsx.torch.loss(logits, labels, label_smoothing=0.1)"
    assert result.details["precision"] > 1e-8  # float32 noise seen by the probes
    # float64 code keeps float64 precision: ε = 0.1234567 is not rounded to 0.12
    assert _identify._nice(0.12345670000001, 1e-9) == 0.1234567
    assert _identify._nice(0.0999997, 2.6e-6) == 0.1 and _identify._nice(0.0999997, 1e-9) == 0.0999997


@pytest.mark.parametrize(
    "target, message",
    [
        ("nowhere.py:f", "no such file"),
        (f"{ZOO}", "expected FILE.py:NAME"),
        (f"{ZOO}:no_such_loss", "has no 'no_such_loss'"),
        (f"{ZOO}:NOT_CALLABLE", "not a function or callable class"),
        (f"{ZOO}:NeedsArguments", "no value for margin; pass it with --init 'margin=...'"),
        (f"{ZOO}:raises", "RuntimeError: boom"),
        (f"{ZOO}:wrong_shape", "shape (5, 2)"),
        (f"{ZOO}:returns_none", "it returned None (a missing `return`?); expected the loss: a scalar, or one"),
        (f"{ZOO}:returns_tuple", "it returned a tuple of 2 (Tensor, Tensor); expected the loss"),
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
    assert "0.001 · w_y · L²" in out and "KL form" in out and "ignore_index=None" in out


_NUMBER = r"([\d.e+-]+)"


def _printed_line(out: str, prefix: str) -> str:
    return next(line.strip() for line in out.splitlines() if line.strip().startswith(prefix))


def _printed_terms(formula: str) -> list[tuple[str, str]]:
    """``a  +  b  −  c`` as [("+", a), ("+", b), ("−", c)] (terms are set off by two spaces)."""
    import re

    parts = re.split(r"\s{2}([+−])\s{2}", formula)
    return [("+", parts[0])] + list(zip(parts[1::2], parts[2::2]))


class _Printed:
    """The formula ``lsx explain`` printed, evaluated on one element (logits x over K classes, label y)."""

    def __init__(self, out: str, k: int):
        import re

        self.out = out
        m = re.search(rf"with K=(\d+): q_y = {_NUMBER}, q_c = {_NUMBER}", out)
        assert m and int(m.group(1)) == k
        self.q_y, self.q_c = float(m.group(2)), float(m.group(3))
        capped = re.search(rf"^  x'_c = {_NUMBER}·tanh\(x_c/{_NUMBER}\)  ", out, re.MULTILINE)
        self.softcap = float(capped.group(1)) if capped else None
        if capped:
            assert float(capped.group(2)) == self.softcap

    def inputs(self, x: np.ndarray, y: int):
        q = np.full(len(x), self.q_c)
        q[y] = self.q_y
        xc = x if self.softcap is None else self.softcap * np.tanh(x / self.softcap)
        lse = float(np.log(np.sum(np.exp(xc))))
        return q, np.ones(len(x)), xc, lse

    def loss(self, x: np.ndarray, y: int) -> float:
        import re

        q, w, xc, lse = self.inputs(x, y)
        line = _printed_line(self.out, "loss_i = ")
        formula = re.split(r"\s{4,}\(", line[len("loss_i = ") :])[0]  # drop the note after the formula
        total = 0.0
        for sign, term in _printed_terms(formula):
            if term == "Σ_c w_c q_c (L − x_c)" and self.softcap is None:
                value = np.sum(w * q * (lse - x))
            elif term == "Σ_c w_c q_c (L − x'_c)" and self.softcap is not None:
                value = np.sum(w * q * (lse - xc))
            elif term == "Σ_c w_c q_c log q_c":
                value = np.sum(w * q * np.log(q))
            elif (z := re.fullmatch(rf"{_NUMBER} · w_y · L²", term)) is not None:
                value = float(z.group(1)) * w[y] * lse**2
            else:
                raise AssertionError(f"unknown term {term!r} in {line!r}")
            total += value if sign == "+" else -value
        return float(total)

    def grad(self, x: np.ndarray, y: int) -> np.ndarray:
        import re

        q, w, xc, lse = self.inputs(x, y)
        line = _printed_line(self.out, "∂loss_i/∂x_c = ")
        formula, softmax_of = line[len("∂loss_i/∂x_c = ") :].split(",      p = ")
        p = np.exp(xc - lse)
        assert softmax_of == ("softmax(x')" if self.softcap is not None else "softmax(x)")
        factor = np.ones(len(x))
        chain = re.fullmatch(rf"\(1 − tanh²\(x_c/{_NUMBER}\)\) · \[(.*)\]", formula)
        assert (chain is not None) == (self.softcap is not None), line
        if chain:
            assert float(chain.group(1)) == self.softcap
            factor = 1 - np.tanh(x / self.softcap) ** 2
            formula = chain.group(2)
        total = np.zeros(len(x))
        for sign, term in _printed_terms(formula):
            if term == "(Σ_k w_k q_k) · p_c":
                value = np.sum(w * q) * p
            elif term == "w_c q_c":
                value = w * q
            elif (z := re.fullmatch(rf"2 · {_NUMBER} · w_y L p_c", term)) is not None:
                value = 2 * float(z.group(1)) * w[y] * lse * p
            else:
                raise AssertionError(f"unknown term {term!r} in {line!r}")
            total += value if sign == "+" else -value
        return factor * total

    def reduce(self, losses: np.ndarray) -> tuple[float, float]:
        """(the printed mean of these per-element losses, the factor on each element's gradient)."""
        import re

        line = _printed_line(self.out, 'reduction="')
        given = re.fullmatch(rf'reduction="mean": Σ_i loss_i / {_NUMBER}\s{{4,}}\(denominator=\1 replaces .*\)', line)
        if given:
            return float(np.sum(losses)) / float(given.group(1)), 1 / float(given.group(1))
        empty = re.fullmatch(r'reduction="mean" with denominator=0: the mean is (NaN|0) \(.*\), its gradient 0', line)
        if empty:
            return (math.nan if empty.group(1) == "NaN" else 0.0), 0.0
        assert line.startswith('reduction="mean": Σ_i loss_i / Σ_i sample_weight_i·w_{y_i} over non-ignored'), line
        return float(np.sum(losses)) / len(losses), 1 / len(losses)


def _library(x, y, options):
    """lsx.numpy's loss and gradient, which the float64 reference confirms."""
    import lsx.numpy

    loss, grad = lsx.numpy.loss_and_grad(x, y, **options)
    np.testing.assert_allclose(loss, spec.reference_loss(x, y, **options), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad, spec.reference_grad(x, y, **options), rtol=1e-12, atol=1e-15)
    return loss, grad


@pytest.mark.parametrize(
    "argv, options",
    [
        (["--convention", "t5x", "--label-smoothing", "0.1"], dict(convention="t5x", label_smoothing=0.1)),
        (["--normalize", "--label-smoothing", "0.3"], dict(normalize=True, label_smoothing=0.3)),
        (
            ["--z-loss", "0.01", "--spread", "others", "--label-smoothing", "0.2"],
            dict(z_loss=0.01, spread="others", label_smoothing=0.2),
        ),
        (["--convention", "torch", "--label-smoothing", "0.1"], dict(convention="torch", label_smoothing=0.1)),
        (["--softcap", "2.5", "--label-smoothing", "0.1"], dict(softcap=2.5, label_smoothing=0.1)),
        (
            ["--convention", "t5x", "--label-smoothing", "0.1", "--softcap", "3", "--z-loss", "0.05"],
            dict(convention="t5x", label_smoothing=0.1, softcap=3.0, z_loss=0.05),
        ),
    ],
)
def test_explain_formula_evaluates_to_the_library(capsys, argv, options):
    """The printed formula, with the printed q, gives lsx's loss and gradient: the KL term is + Σ w q log q
    (= −H); with softcap the logits are x' = c·tanh(x/c) and the gradient carries 1 − tanh²(x/c)."""
    assert main(["explain", *argv, "-K", "5"]) == 0
    printed = _Printed(capsys.readouterr().out, 5)
    assert (printed.softcap is not None) == ("softcap" in options)
    rng = np.random.default_rng(0)
    x = rng.normal(scale=3.0, size=5)  # beyond the cap: tanh bends
    per_element = dict(options, reduction="none", ignore_index=None)
    loss, grad = _library(x[None], np.array([2]), per_element)
    assert printed.loss(x, 2) == pytest.approx(float(loss[0]), rel=1e-5)
    np.testing.assert_allclose(printed.grad(x, 2), grad[0], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "argv, options",
    [
        ([], {}),
        (["--denominator", "2.5"], dict(denominator=2.5)),
        (
            ["--denominator", "2.5", "--softcap", "1.5", "--z-loss", "0.1"],
            dict(denominator=2.5, softcap=1.5, z_loss=0.1),
        ),
        (["--denominator", "0", "--empty-mean", "zero"], dict(denominator=0.0, empty_mean="zero")),
        (["--denominator", "0"], dict(denominator=0.0)),
    ],
)
def test_explain_mean_evaluates_to_the_library(capsys, argv, options):
    """The printed mean (its denominator: the element count here, or the one given) gives lsx's mean and
    gradient over a batch; a zero denominator follows empty_mean with a zero gradient."""
    assert main(["explain", "--label-smoothing", "0.2", *argv, "-K", "4"]) == 0
    printed = _Printed(capsys.readouterr().out, 4)
    rng = np.random.default_rng(1)
    x, y = rng.normal(scale=2.0, size=(3, 4)), np.array([0, 3, 1])
    mean, factor = printed.reduce(np.array([printed.loss(row, label) for row, label in zip(x, y)]))
    grads = np.stack([printed.grad(row, label) for row, label in zip(x, y)]) * factor
    loss, grad = _library(x, y, dict(options, label_smoothing=0.2))
    np.testing.assert_allclose(mean, loss, rtol=1e-6)
    np.testing.assert_allclose(grads, grad, rtol=1e-6, atol=1e-12)


def test_explain_sample_weight_in_words(capsys):
    """sample_weight, an array, is not a flag: explain says how it enters the loss and the mean."""
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    assert "loss_i ← sample_weight_i · loss_i" in out
    assert "Σ_i loss_i / Σ_i sample_weight_i·w_{y_i} over non-ignored elements" in out
    assert "sample_weight=None" not in out and "softcap=None" in out and "denominator=None" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--softcap", "0"], "softcap must be > 0 and finite (or None), got softcap=0.0"),
        (["--softcap", "-2"], "softcap must be > 0 and finite (or None), got softcap=-2.0"),
        (["--softcap", "inf"], "softcap must be > 0 and finite (or None), got softcap=inf"),
        (["--denominator", "-1"], "denominator must be finite and >= 0, got denominator=-1.0"),
        (["--denominator", "nan"], "denominator must be finite and >= 0, got denominator=nan"),
        (["--denominator", "4", "--reduction", "sum"], 'denominator is only for reduction="mean"'),
        (["--denominator", "4", "--convention", "t5x"], 'denominator is only for reduction="mean"'),
    ],
)
def test_explain_checks_softcap_and_denominator_like_loss(capsys, argv, message):
    assert main(["explain", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lsx: error: {message}") and "Traceback" not in err
    options = {"softcap": None, "denominator": None, "reduction": None, "convention": None}
    flags = dict(zip(argv[::2], argv[1::2]))
    for flag, value in flags.items():
        options[flag[2:]] = value if flag in ("--reduction", "--convention") else float(value)
    convention = options.pop("convention")
    with pytest.raises(ValueError, match=message.split(",")[0].replace("(", r"\(").replace(")", r"\)")):
        spec.resolve_options(convention, **{n: v for n, v in options.items() if v is not None})


def test_explain_definition_is_the_documented_definition():
    """The documentation's definition block prints the same two lines as lsx.cli._explain.definition()."""
    from lsx.cli import _explain

    with open(os.path.join(ROOT, "docs", "definition.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    for line in _explain.definition():
        assert " ".join(line.split()) in readme, line


def test_explain_checks_the_class_count_like_loss(capsys):
    assert main(["explain", "--spread", "others", "--label-smoothing", "0.1", "-K", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith('lsx: error: -K 1: spread="others" needs at least 2 classes') and "Traceback" not in err
    assert main(["explain", "--label-smoothing", "0.1", "-K", "1"]) == 0
    out = capsys.readouterr().out
    assert "with K=1: q_y = 1 (there is no other class)" in out and "q_c = 0.1 (c ≠ y)" not in out
    assert main(["explain", "-K", "0"]) == 2
    assert "--num-classes must be >= 1" in capsys.readouterr().err


def test_explain_says_left_out_of_the_mean_only_for_a_mean_it_divides(capsys):
    assert main(["explain"]) == 0
    assert "elements with label -100: loss 0, gradient 0, left out of the mean" in capsys.readouterr().out
    for argv in (["--reduction", "sum"], ["--reduction", "none"], ["--denominator", "32"]):
        assert main(["explain", *argv]) == 0
        out = capsys.readouterr().out
        assert "elements with label -100: loss 0, gradient 0" in out and "left out of the mean" not in out, argv
    assert main(["explain", "--denominator", "32"]) == 0
    assert "(the mean divides by the denominator given, whatever they are)" in capsys.readouterr().out


def test_version(capsys):
    import lsx

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"lsx {lsx.__version__}\n"
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        assert 'version = { attr = "lsx.__version__" }' in f.read()  # the metadata's version is this one
    assert lsx.__version__ == "0.2.0"


def test_explain_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    out = capsys.readouterr().out
    options = [a for a in out.split() if a.startswith("--") and a != "--help"]
    assert {"--label-smoothing", "--spread", "--z-loss", "--normalize", "--reduction", "--empty-mean"} <= set(options)
    import argparse

    explain = _explain_parser()
    for action in explain._actions:
        if action.option_strings and "--help" not in action.option_strings:
            assert action.help and action.help != argparse.SUPPRESS, action.option_strings


def _explain_parser():
    from lsx.cli import _parser

    parser = _parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return subparsers.choices["explain"]


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
    assert done.returncode == 0 and "loss_i = Σ_c w_c q_c (L − x_c)" in done.stdout
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


# --------------------------------------------------------------------------------------------------------
# .ci/run
# --------------------------------------------------------------------------------------------------------
CI_RUN = os.path.join(ROOT, ".ci", "run")


def _ci_run_with_failing_python(tmp_path, **env):
    """.ci/run with a python3 that makes the virtual environment's folder and fails: what is left behind?"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python3"
    stub.write_text('#!/bin/sh\nmkdir -p "$3" && echo 3GB > "$3/payload"\nexit 3\n')
    stub.chmod(0o755)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    environment = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(scratch), **env)
    if "LSX_CI_VENV" not in env:
        environment.pop("LSX_CI_VENV", None)
    done = subprocess.run(["bash", CI_RUN], env=environment, capture_output=True, text=True)
    return done, scratch


def test_ci_run_removes_its_temporary_venv(tmp_path):
    done, scratch = _ci_run_with_failing_python(tmp_path)
    assert done.returncode == 3, done.stderr
    assert list(scratch.iterdir()) == []  # the temporary folder and its venv are gone


def test_ci_run_keeps_a_named_venv(tmp_path):
    kept = tmp_path / "kept-venv"
    done, _ = _ci_run_with_failing_python(tmp_path, LSX_CI_VENV=str(kept))
    assert done.returncode == 3 and (kept / "payload").exists()


def test_ci_run_lists_tensorflow_cpu_in_both_spellings():
    import re

    with open(CI_RUN, encoding="utf-8") as f:
        pattern = re.search(r"grep -Ei '([^']+)'", f.read()).group(1)
    for line in ("tensorflow_cpu 2.21.0", "tensorflow-cpu 2.21.0", "torch 2.13.0+cpu", "numpy 2.4.6"):
        assert re.search(pattern, line, re.IGNORECASE), line
    assert not re.search(pattern, "tensorflow-io 0.37", re.IGNORECASE)
