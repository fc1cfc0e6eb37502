"""lsx.transformers: the patched causal LMs (Llama, Qwen2, Mistral, Gemma, Gemma 2, Gemma 3) against an
independent float64 loss of the unpatched model's logits, loss and every parameter's gradient; HF's own loss
at ε = 0; gradient accumulation through num_items_in_batch and the Trainer; bad options; loss_function.

Tiny models are built from configs with random weights; nothing is downloaded."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

torch = pytest.importorskip("torch")
if "all" in os.environ.get("LSX_TEST_BACKENDS", "").split(","):
    import transformers  # CI requires every extra: a missing one fails instead of skipping
else:
    transformers = pytest.importorskip("transformers")

import lsx.torch  # noqa: E402
import lsx.transformers  # noqa: E402
from lsx import spec  # noqa: E402

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
V = 260  # lm_head rows
REAL = 250  # real classes, for vocab_size=
SIZES = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,  # logits of order 1, so that smoothing, z-loss and the cap all matter
)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0}),
}


def make_model(arch: str = "llama", seed: int = 0, dtype=F64, bias: bool = False):
    config_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(**SIZES, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype)
    if bias:  # a head with a bias (the six have none): the fused path must add and differentiate it
        head = torch.nn.Linear(config.hidden_size, V, bias=True, dtype=dtype)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.copy_(0.5 * torch.randn(V, dtype=dtype))
        model.lm_head = head
    return model.train()


def batch(seed: int = 1, shape=(2, 7)):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, REAL, shape, generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt left out
    labels[-1, -1] = -100
    return ids, labels


def shifted(labels):
    return torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)


def reference(logits, target, *, eps=0.0, spread="all", weight=None, z=0.0, normalize=False, real=None, cap=None):
    """The definition written out in plain torch (differentiable): mean over the non-ignored targets of
    Σ_c w_c q_c (L − x_c) + z·w_y·L² + [normalize] Σ_c w_c q_c log q_c over the real classes."""
    x = logits.reshape(-1, logits.shape[-1])
    if cap is not None:
        x = cap * torch.tanh(x / cap)
    keep = target != -100
    x, y = x[keep], target[keep]
    k = x.shape[-1] if real is None else real
    x = x[:, :k]
    w = torch.ones(k, dtype=x.dtype) if weight is None else weight[:k].to(x.dtype)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(y, k).to(x.dtype)
    if spread == "all":
        q = (1 - eps) * onehot + eps / k
    else:
        q = (1 - eps) * onehot + eps / (k - 1) * (1 - onehot)
    per = (w * q * (lse - x)).sum(-1) + z * w[y] * lse[:, 0] ** 2
    if normalize:
        per = per + (w * torch.special.xlogy(q, q)).sum(-1)
    return per.sum() / w[y].sum()


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, want, rtol=1e-9, atol=1e-12):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


def patched_and_reference(arch, options, ref_options, seed=0, bias=False, shape=(2, 7)):
    """(loss, grads) of the patched model and of the reference formula on the unpatched model's logits."""
    model = make_model(arch, seed, bias=bias)
    plain = copy.deepcopy(model)
    ids, labels = batch(seed + 1, shape)
    lsx.transformers.apply(model, **options)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    assert out.loss.dtype == F64
    out.loss.backward()
    logits = plain(input_ids=ids).logits  # HF's logits: Gemma 2/3 already soft-capped by their config
    want = reference(logits, shifted(labels), **ref_options)
    want.backward()
    # the formula above is the spec's definition: check it against the float64 reference once more
    spec_options = {
        k: v
        for k, v in dict(
            label_smoothing=ref_options.get("eps", 0.0),
            spread=ref_options.get("spread", "all"),
            z_loss=ref_options.get("z", 0.0),
            normalize=ref_options.get("normalize", False),
            softcap=ref_options.get("cap"),
        ).items()
    }
    if ref_options.get("weight") is not None:
        spec_options["weight"] = ref_options["weight"].numpy()
    if ref_options.get("real") is not None:
        spec_options["class_mask"] = np.arange(V) < ref_options["real"]
    np.testing.assert_allclose(
        spec.reference_loss(logits.detach().reshape(-1, V).numpy(), shifted(labels).numpy(), **spec_options),
        want.item(),
        rtol=1e-12,
    )
    return out.loss, grads(model), want, grads(plain)


CLASS_WEIGHT = torch.linspace(0.5, 1.5, V, dtype=F64)
CASES = {
    "eps0": ({}, {}),
    "all": (dict(label_smoothing=0.1), dict(eps=0.1)),
    "others-masked": (
        dict(label_smoothing=0.1, spread="others", vocab_size=REAL),
        dict(eps=0.1, spread="others", real=REAL),
    ),
    "zloss-weight": (dict(label_smoothing=0.2, z_loss=1e-2, weight=CLASS_WEIGHT), dict(eps=0.2, z=1e-2, weight=CLASS_WEIGHT)),
    "kl": (dict(label_smoothing=0.1, normalize=True, vocab_size=REAL), dict(eps=0.1, normalize=True, real=REAL)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_loss_and_every_gradient_match_the_reference(arch, case):
    options, ref_options = CASES[case]
    loss, got, want, want_grads = patched_and_reference(arch, options, ref_options)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    assert_same_grads(got, want_grads)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_epsilon_zero_equals_hf_own_loss(arch):
    model = make_model(arch)
    plain = copy.deepcopy(model)
    ids, labels = batch()
    hf = plain(input_ids=ids, labels=labels).loss
    hf.backward()
    lsx.transformers.apply(model)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    assert loss.dtype == F64  # HF's is float32: ForCausalLMLoss upcasts with logits.float(), float64 included
    torch.testing.assert_close(loss, hf.double(), rtol=1e-6, atol=0)
    assert_same_grads(grads(model), grads(plain), rtol=1e-4, atol=1e-7)


def test_softcap_explicit_on_llama_and_replacing_gemma2s():
    loss, got, want, want_grads = patched_and_reference("llama", dict(softcap=1.5, label_smoothing=0.1), dict(cap=1.5, eps=0.1))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    assert_same_grads(got, want_grads)
    # Gemma 2: an explicit cap replaces the config's; None removes it (the reference recomputes the logits)
    for cap in (1.0, None):
        model = make_model("gemma2")
        plain = copy.deepcopy(model)
        plain.config.final_logit_softcapping = None
        ids, labels = batch()
        lsx.transformers.apply(model, softcap=cap)
        loss = model(input_ids=ids, labels=labels).loss
        want = reference(plain(input_ids=ids).logits, shifted(labels), cap=cap)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)


def test_head_bias_is_added_and_differentiated():
    loss, got, want, want_grads = patched_and_reference("qwen2", dict(label_smoothing=0.1), dict(eps=0.1), bias=True)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    assert "lm_head.bias" in got
    assert_same_grads(got, want_grads)


def test_logits_none_in_fused_training_and_unchanged_otherwise():
    model = make_model("gemma2")
    plain = copy.deepcopy(model).eval()
    ids, labels = batch()
    want = plain(input_ids=ids).logits
    lsx.transformers.apply(model, label_smoothing=0.1)
    assert model(input_ids=ids, labels=labels).logits is None
    with torch.no_grad():
        assert model(input_ids=ids, labels=labels).logits is None
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)  # training, no labels
    model.eval()
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, want, rtol=0, atol=0)
    # eval with labels: the same lsx loss, computed from the returned logits
    torch.testing.assert_close(out.loss, reference(want, shifted(labels), eps=0.1), rtol=1e-12, atol=0)
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
    # generate is the original model's
    prompt = ids[:, :3]
    torch.testing.assert_close(
        model.generate(prompt, max_new_tokens=3, do_sample=False),
        plain.generate(prompt, max_new_tokens=3, do_sample=False),
    )


def test_keywords_positional_inputs_return_dict_logits_to_keep():
    model = make_model()
    ids, labels = batch()
    lsx.transformers.apply(model, label_smoothing=0.1)
    want = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(model(ids, labels=labels).loss, want, rtol=0, atol=0)
    torch.testing.assert_close(model(ids, None, None, None, None, labels).loss, want, rtol=0, atol=0)
    as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], want, rtol=0, atol=0)
    # shift_labels taken as given; logits_to_keep keeps the last positions, as HF's forward
    shift = shifted(labels).reshape(labels.shape)
    torch.testing.assert_close(model(input_ids=ids, labels=labels, shift_labels=shift).loss, want, rtol=0, atol=0)
    last = model(input_ids=ids, labels=labels, shift_labels=shift[:, -3:], logits_to_keep=3).loss
    plain_logits = copy.deepcopy(model).eval()(input_ids=ids).logits
    torch.testing.assert_close(last, reference(plain_logits[:, -3:], shift[:, -3:].reshape(-1), eps=0.1), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=3)


@pytest.mark.parametrize("count", ["int", "int-tensor", "float-tensor"])
def test_two_micro_batches_with_num_items_equal_one_full_batch(count):
    model = make_model("qwen2")  # float64 throughout (the Gemmas' RMSNorms compute in float32)
    ids, labels = batch(shape=(4, 7))
    labels[1, :5] = -100  # uneven: a per-micro-batch mean would weigh the tokens differently
    lsx.transformers.apply(model, label_smoothing=0.1, spread="others", vocab_size=REAL, softcap=1.5)
    full = model(input_ids=ids, labels=labels).loss
    full.backward()
    want = grads(model)
    model.zero_grad()
    n = int((shifted(labels) != -100).sum())
    num_items = {"int": n, "int-tensor": torch.tensor(n), "float-tensor": torch.tensor(float(n))}[count]
    total = 0
    for part in (slice(0, 2), slice(2, 4)):
        loss = model(input_ids=ids[part], labels=labels[part], num_items_in_batch=num_items).loss
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=0)
    assert_same_grads(grads(model), want)
    plain = copy.deepcopy(model).eval()
    halves = (slice(0, 2), slice(2, 4))
    means = [reference(plain(input_ids=ids[p]).logits, shifted(labels[p]), eps=0.1, spread="others", real=REAL, cap=1.5) for p in halves]
    assert not torch.isclose(sum(means) / 2, full.detach())


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def _collate(features):
    """Right padding to the longest row of this micro-batch: labels −100 and attention 0 on the padding."""
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), longest, dtype=torch.long)
    labels = torch.full((len(features), longest), -100)
    mask = torch.zeros(len(features), longest, dtype=torch.long)
    for i, f in enumerate(features):
        row = torch.tensor(f["input_ids"])
        ids[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = row, row, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _trainer_step(tmp_path, per_device, accumulation):
    model = lsx.transformers.apply(make_model("llama", seed=3), label_smoothing=0.1, spread="others", vocab_size=REAL)
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, REAL, (length,), generator=gen).tolist() for length in (9, 3, 6, 4)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"{per_device}x{accumulation}"),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        seed=7,
        disable_tqdm=True,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(rows), data_collator=_collate)
    assert trainer.model_accepts_loss_kwargs  # so that num_items_in_batch reaches the patched forward
    trainer.train()
    return before, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainer_batch_4x1_and_2x2_take_the_same_step(tmp_path):
    before, one = _trainer_step(tmp_path, 4, 1)
    _, two = _trainer_step(tmp_path, 2, 2)
    moved = [k for k in before if not torch.equal(before[k], one[k])]
    assert "lm_head.weight" in moved and len(moved) > 10
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-10, atol=1e-12, msg=key)


def test_apply_twice_last_options_win_on_the_original_forward():
    model = make_model()
    ids, labels = batch()
    original = type(model).forward
    lsx.transformers.apply(model, label_smoothing=0.3, z_loss=0.1)
    lsx.transformers.apply(model, label_smoothing=0.1, spread="others")
    assert model.forward.original.__func__ is original
    twice = model(input_ids=ids, labels=labels).loss
    once = lsx.transformers.apply(make_model(), label_smoothing=0.1, spread="others")(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(twice, once, rtol=0, atol=0)
    clone = copy.deepcopy(model)  # the patch moves with a copy, bound to the copy
    assert clone.forward.model is clone and clone.forward.original.__self__ is clone
    torch.testing.assert_close(clone(input_ids=ids, labels=labels).loss, once, rtol=0, atol=0)


def test_convention_is_not_overridden_by_the_signature_defaults():
    ids, labels = batch()
    hf = lsx.transformers.apply(make_model(), convention="hf")(input_ids=ids, labels=labels).loss
    explicit = lsx.transformers.apply(make_model(), label_smoothing=0.1)(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(hf, explicit, rtol=0, atol=0)
    plain = make_model()
    # an explicit option wins over the convention's
    zero = lsx.transformers.apply(make_model(), convention="hf", label_smoothing=0.0)(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(zero, reference(plain(input_ids=ids).logits, shifted(labels)), rtol=1e-12, atol=0)
    # fairseq: its spread and ε, but the reduction stays HF's mean and −100 stays the ignored label
    fairseq = lsx.transformers.apply(make_model(), convention="fairseq", label_smoothing=0.1)(input_ids=ids, labels=labels).loss
    want = reference(plain(input_ids=ids).logits, shifted(labels), eps=0.1, spread="others")
    torch.testing.assert_close(fairseq, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(spread="some"), ValueError, "spread"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(vocab_size=0), ValueError, "vocab_size"),
        (dict(vocab_size=-3), ValueError, "vocab_size"),
        (dict(vocab_size=V + 1), ValueError, "vocab_size"),
        (dict(vocab_size=2.5), ValueError, "vocab_size"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(weight=torch.ones(V - 1)), ValueError, "weight"),
        (dict(weight=-torch.ones(V)), ValueError, "weight"),
        (dict(ignore_index=None), ValueError, "ignore_index"),
        (dict(convention="nope"), ValueError, "convention"),
        (dict(vocab_size=1, label_smoothing=0.1, spread="others"), ValueError, "others"),
    ],
)
def test_bad_options_raise_from_apply(options, error, match):
    model = make_model()
    forward = model.forward
    with pytest.raises(error, match=match):
        lsx.transformers.apply(model, **options)
    assert "forward" not in model.__dict__ and model.forward == forward  # nothing patched


def test_models_apply_does_not_cover_are_refused():
    model = make_model()
    with pytest.raises(ValueError, match="lm_head"):
        lsx.transformers.apply(model.model)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(TypeError, match="lm_head"):
        lsx.transformers.apply(model)
    scaled = make_model()
    scaled.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        lsx.transformers.apply(scaled)


def test_loss_function_on_an_unpatched_model():
    model = make_model("mistral")
    plain = copy.deepcopy(model)
    ids, labels = batch()
    hf = plain(input_ids=ids, labels=labels).loss
    model.loss_function = lsx.transformers.loss_function()
    out = model(input_ids=ids, labels=labels)
    assert out.loss.dtype == F64
    torch.testing.assert_close(out.loss, hf.double(), rtol=1e-6, atol=0)  # HF's: float32
    model.loss_function = lsx.transformers.loss_function(label_smoothing=0.1, spread="others", vocab_size=REAL)
    out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(7))
    out.loss.backward()
    want = reference(plain(input_ids=ids).logits, shifted(labels), eps=0.1, spread="others", real=REAL)
    n = (shifted(labels) != -100).sum()
    (want * n / 7).backward()
    torch.testing.assert_close(out.loss, want * n / 7, rtol=1e-12, atol=0)
    assert_same_grads(grads(model), grads(plain))


def test_loss_function_signature_float32_and_its_checks():
    import inspect

    fn = lsx.transformers.loss_function(label_smoothing=0.1)
    names = list(inspect.signature(fn).parameters)
    assert names == ["logits", "labels", "vocab_size", "num_items_in_batch", "ignore_index", "shift_labels", "kwargs"]
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.randn(2, 6, 30, dtype=torch.bfloat16)
    labels = torch.randint(0, 30, (2, 6))
    plain = lsx.transformers.loss_function()
    got, want = plain(logits, labels, 30), ForCausalLMLoss(logits, labels, 30)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    labels[0, 2] = 7  # the call's ignore_index replaces the factory's
    torch.testing.assert_close(plain(logits, labels, 30, ignore_index=7), ForCausalLMLoss(logits, labels, 30, ignore_index=7))
    with pytest.raises(ValueError, match="vocab_size"):
        lsx.transformers.loss_function(vocab_size=40)(logits, labels, 30)
    with pytest.raises(ValueError, match="label_smoothing"):
        lsx.transformers.loss_function(label_smoothing=2)


def test_half_precision_model_gives_a_float32_loss_close_to_float64():
    ids, labels = batch()
    want = lsx.transformers.apply(make_model(), label_smoothing=0.1)(input_ids=ids, labels=labels).loss
    model = lsx.transformers.apply(make_model(dtype=torch.bfloat16), label_smoothing=0.1)
    loss = model(input_ids=ids, labels=labels).loss
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=3e-2, atol=0)
    loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.bfloat16


def test_trainer_example_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "trainer_label_smoothing.py"), "--steps", "3", "--output-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "eval_loss" in done.stdout


def test_autocast_mixed_precision_training():
    """The Trainer's bf16=True: float32 weights under autocast; the fused head runs in bfloat16 as HF's does."""
    ids, labels = batch()
    model = lsx.transformers.apply(make_model(dtype=torch.float32), label_smoothing=0.1)
    plain = copy.deepcopy(model).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=labels).loss
        logits = plain(input_ids=ids).logits
    assert loss.dtype == torch.float32 and logits.dtype == torch.bfloat16
    loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference(logits.double(), shifted(labels), eps=0.1), rtol=1e-2, atol=0)
