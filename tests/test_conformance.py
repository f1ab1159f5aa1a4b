"""rnnmath as a drop-in for torch.nn's RNN API: the contract around the numbers, with torch.nn as the oracle.

Part 1 drives rnnmath's six classes (RNN, LSTM, GRU, RNNCell, LSTMCell, GRUCell) through the ModuleInfo
entries the installed torch wheel ships in ``torch.testing._internal.common_modules`` (the data torch's own
``test_modules.py`` runs on): each sample's constructor arguments and inputs, swapping ``torch.nn.X`` for
``rnnmath.X`` with the same state dict — same values and gradients as torch.nn, the sample's reference
function (unbatched = batched of one), gradcheck with batched gradients, gradgradcheck, non-contiguous inputs,
factory kwargs — and each error input: the same exception type as torch.nn.

Part 2 covers what those samples do not: proj_size, every autograd mode on the default layer, autocast,
validation, padding that holds NaN/inf, per-sample gradients over lengths, torch.jit.trace and
quantize_dynamic, and each failing input listed in issue 11. docs/compatibility.md is the table of what holds.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnmath

pytest.importorskip("expecttest")  # torch.testing._internal imports it (a dev extra)
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

NAMES = ("RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell")
INFOS = {info.module_cls.__name__: info for info in module_db if info.module_cls.__name__ in NAMES}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def test_every_class_has_a_module_info():
    assert sorted(INFOS) == sorted(NAMES)


# -- helpers ----------------------------------------------------------------------------------------------
def samples(name: str, dtype=torch.float64, requires_grad=True, training=False, **kwargs):
    info = INFOS[name]
    return list(info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad,
                                        training=training, **kwargs))


def sample_ids(name: str, **kwargs) -> list[str]:
    return [f"{name}-{i}" for i in range(len(samples(name, **kwargs)))]


def twins(name: str, constructor, dtype):
    """torch.nn.X and rnnmath.X from the same arguments, rnnmath's loaded from torch's state dict."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(*constructor.args, **constructor.kwargs).to(dtype)
    ours = getattr(rnnmath, name)(*constructor.args, **constructor.kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def tensors_of(obj) -> list[torch.Tensor]:
    """Every tensor in a (nested) output or input, a PackedSequence's data included, in order."""
    if isinstance(obj, PackedSequence):
        return [obj.data]
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors_of(o)]
    return []


def fresh(obj):
    """An independent copy of an input: new leaf tensors with the same values and requires_grad."""
    if isinstance(obj, PackedSequence):
        return obj._replace(data=fresh(obj.data))
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().requires_grad_(obj.requires_grad)
    if isinstance(obj, (tuple, list)):
        return type(obj)(fresh(o) for o in obj)
    return obj


def replace_tensors(obj, new: list[torch.Tensor]):
    """obj with its tensors (in tensors_of order) replaced by those of `new` (consumed from the front)."""
    if isinstance(obj, PackedSequence):
        return obj._replace(data=new.pop(0))
    if isinstance(obj, torch.Tensor):
        return new.pop(0)
    if isinstance(obj, (tuple, list)):
        return type(obj)(replace_tensors(o, new) for o in obj)
    return obj


def weighted_loss(outputs: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
    """Σ w ⊙ output over every output tensor with fixed random weights, so every gradient path is used."""
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)


def run(module, args, kwargs):
    """Forward and backward; returns (outputs, gradients of the inputs, gradients of the parameters by name)."""
    module.zero_grad(set_to_none=True)
    outputs = tensors_of(module(*args, **kwargs))
    leaves = [t for t in tensors_of(args) if t.requires_grad]
    weighted_loss(outputs).backward()
    return ([o.detach() for o in outputs], [t.grad for t in leaves],
            {n: p.grad for n, p in module.named_parameters()})


def assert_same_run(a, b, dtype):
    (out_a, gin_a, gp_a), (out_b, gin_b, gp_b) = a, b
    assert len(out_a) == len(out_b)
    for x, y in zip(out_a, out_b):
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x, y, **TOL[dtype])
    for x, y in zip(gin_a, gin_b):
        torch.testing.assert_close(x, y, **TOL[dtype])
    assert gp_a.keys() == gp_b.keys()
    for n in gp_a:
        torch.testing.assert_close(gp_a[n], gp_b[n], **TOL[dtype], msg=n)


# -- Part 1: torch's ModuleInfo samples ------------------------------------------------------------------
FORWARD_CASES = [(name, i, dtype) for name in NAMES for dtype in (torch.float32, torch.float64)
                 for i in range(len(samples(name, dtype)))]


@pytest.mark.parametrize("name,i,dtype", FORWARD_CASES,
                         ids=[f"{n}-{i}-{str(d)[6:]}" for n, i, d in FORWARD_CASES])
def test_module_info_samples_match_torch(name, i, dtype):
    """Values and every gradient as torch.nn's; the sample's reference function holds; state dicts both ways."""
    sample = samples(name, dtype)[i]
    ref, ours = twins(name, sample.constructor_input, dtype)
    args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
    expected = run(ref, fresh(args), kwargs)
    assert_same_run(run(ours, fresh(args), kwargs), expected, dtype)
    if sample.reference_fn is not None:  # unbatched input = a batch of one, squeezed
        with torch.no_grad():
            got = tensors_of(ours(*fresh(args), **kwargs))
            want = tensors_of(sample.reference_fn(ours, *fresh(args), **kwargs))
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, **TOL[dtype])
    ref2 = copy.deepcopy(ref)
    ref2.load_state_dict(ours.state_dict())  # the other way
    assert_same_run(run(ref2, fresh(args), kwargs), expected, dtype)


PACKED_CASES = [(name, i) for name in ("RNN", "GRU")
                for i, sample in enumerate(samples(name, with_packed_sequence=True))
                if isinstance(sample.forward_input.args[0], PackedSequence)]


@pytest.mark.parametrize("name,i", PACKED_CASES, ids=[f"{n}-{i}" for n, i in PACKED_CASES])
def test_module_info_packed_samples_match_torch(name, i):
    """The PackedSequence samples torch's inputs function makes on request (with_packed_sequence=True)."""
    sample = samples(name, with_packed_sequence=True)[i]
    ref, ours = twins(name, sample.constructor_input, torch.float64)
    args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
    assert_same_run(run(ours, fresh(args), kwargs), run(ref, fresh(args), kwargs), torch.float64)


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a doubled last axis)."""
    wide = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
    assert not wide.is_contiguous() or t.numel() <= 1
    return wide.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("name", NAMES)
def test_module_info_samples_non_contiguous(name):
    """Non-contiguous inputs and hx give the results of contiguous ones (torch's test_non_contiguous_tensors)."""
    for sample in samples(name):
        _, ours = twins(name, sample.constructor_input, torch.float64)
        args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
        plain = run(ours, fresh(args), kwargs)
        strided = replace_tensors(args, [_non_contiguous(t) for t in tensors_of(args)])
        assert_same_run(run(ours, strided, kwargs), plain, torch.float64)


def _grad_function(ours, args, kwargs):
    """f(*input tensors, *parameters) -> outputs, for gradcheck: the parameters go through functional_call."""
    names = [n for n, _ in ours.named_parameters()]
    n_in = len(tensors_of(args))

    def f(*flat):
        inputs, params = list(flat[:n_in]), dict(zip(names, flat[n_in:]))
        out = torch.func.functional_call(ours, params, replace_tensors(args, inputs), kwargs)
        return tuple(tensors_of(out))

    leaves = [t.detach().clone().requires_grad_() for t in tensors_of(args)]
    return f, (*leaves, *(p.detach().clone().requires_grad_() for p in ours.parameters()))


GRAD_CASES = [(name, i) for name in NAMES for i in range(len(samples(name)))]


@pytest.mark.parametrize("name,i", GRAD_CASES, ids=[f"{n}-{i}" for n, i in GRAD_CASES])
def test_module_info_samples_gradcheck(name, i):
    """Finite differences (torch's test_grad) with batched gradients (is_grads_batched), on the default path."""
    sample = samples(name)[i]
    _, ours = twins(name, sample.constructor_input, torch.float64)
    f, inputs = _grad_function(ours, sample.forward_input.args, sample.forward_input.kwargs)
    assert torch.autograd.gradcheck(f, inputs, check_batched_grad=True, fast_mode=True)


# gradgradcheck on every fourth layer sample (all cell samples) keeps the suite's time reasonable
GRADGRAD_CASES = [(n, i) for n, i in GRAD_CASES if n.endswith("Cell") or i % 4 == 0]


@pytest.mark.parametrize("name,i", GRADGRAD_CASES, ids=[f"{n}-{i}" for n, i in GRADGRAD_CASES])
def test_module_info_samples_gradgradcheck(name, i):
    """Second derivatives by finite differences of the first (torch's test_gradgrad), on the default path."""
    sample = samples(name)[i]
    _, ours = twins(name, sample.constructor_input, torch.float64)
    f, inputs = _grad_function(ours, sample.forward_input.args, sample.forward_input.kwargs)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


def error_samples(name: str):
    info = INFOS[name]
    return list(info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                              training=False))


ERROR_CASES = [(name, i) for name in NAMES for i in range(len(error_samples(name)))]


@pytest.mark.parametrize("name,i", ERROR_CASES, ids=[f"{n}-{i}" for n, i in ERROR_CASES])
def test_module_info_error_inputs(name, i):
    """Each of torch's error inputs raises the same exception type in rnnmath, with a message that says what
    was expected (torch's own wording for the constructor arguments)."""
    error = error_samples(name)[i]
    constructor, forward_input = error.module_error_input.constructor_input, error.module_error_input.forward_input
    ours_cls, ref_cls = getattr(rnnmath, name), getattr(torch.nn, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error.error_type, match=error.error_regex):
                ref_cls(*constructor.args, **constructor.kwargs)  # the oracle still behaves as recorded
            with pytest.raises(error.error_type) as caught:
                ours_cls(*constructor.args, **constructor.kwargs)
            assert re.search(error.error_regex, str(caught.value)), str(caught.value)
        else:
            torch.manual_seed(0)
            ref = ref_cls(*constructor.args, **constructor.kwargs)
            ours = ours_cls(*constructor.args, **constructor.kwargs)
            with pytest.raises(error.error_type):
                ref(*forward_input.args, **forward_input.kwargs)
            with pytest.raises(error.error_type) as caught:
                ours(*forward_input.args, **forward_input.kwargs)
            assert str(caught.value)


@pytest.mark.parametrize("name", NAMES)
def test_factory_kwargs_repr_and_deepcopy(name):
    """dtype= and device= reach every parameter (meta included); repr and deepcopy work as torch.nn's."""
    sample = samples(name)[0]
    c = sample.constructor_input
    for dtype in (torch.float64, torch.bfloat16):
        m = getattr(rnnmath, name)(*c.args, **c.kwargs, dtype=dtype)
        assert all(p.dtype == dtype for p in m.parameters())
    meta = getattr(rnnmath, name)(*c.args, **c.kwargs, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    ours = getattr(rnnmath, name)(*c.args, **c.kwargs)
    ref = getattr(torch.nn, name)(*c.args, **c.kwargs)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert repr(ours).startswith(name + "(")
    twin = copy.deepcopy(ours)
    for a, b in zip(twin.parameters(), ours.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


# -- Part 2, point 1: proj_size ---------------------------------------------------------------------------
PROJ_CONFIGS = [dict(num_layers=L, bidirectional=bd, bias=b, batch_first=bf)
                for L in (1, 2) for bd in (False, True) for b in (True, False) for bf in (False, True)]


@pytest.mark.parametrize("config", PROJ_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_lstm_proj_size_matches_torch(config):
    """h_t = W_hr (o_t ⊙ tanh c_t): output (…, D·P), h_n (L·D, B, P), c_n (L·D, B, H), with hx, lengths and packing."""
    torch.manual_seed(1)
    I, H, P, T, B = 3, 5, 2, 6, 4
    ref = torch.nn.LSTM(I, H, proj_size=P, **config).double()
    ours = rnnmath.LSTM(I, H, proj_size=P, **config).double()
    ours.load_state_dict(ref.state_dict())
    assert ours.proj_size == P and "weight_hr_l0" in dict(ours.named_parameters())
    D, L = (2 if config["bidirectional"] else 1), config["num_layers"]
    shape = (B, T, I) if config["batch_first"] else (T, B, I)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    hx = (torch.randn(L * D, B, P, dtype=torch.float64), torch.randn(L * D, B, H, dtype=torch.float64))
    expected = run(ref, fresh((x, hx)), {})
    got = run(ours, fresh((x, hx)), {})
    assert got[0][0].shape[-1] == D * P and got[0][1].shape == (L * D, B, P) and got[0][2].shape == (L * D, B, H)
    assert_same_run(got, expected, torch.float64)
    # lengths= on the padded batch equals torch.nn on the packed batch
    lengths = torch.tensor([6, 2, 4, 1])
    packed = pack_padded_sequence(x.detach(), lengths, batch_first=config["batch_first"], enforce_sorted=False)
    out_ref, (h_ref, c_ref) = ref(packed, hx)
    out_ref, _ = pad_packed_sequence(out_ref, batch_first=config["batch_first"], total_length=T)
    out, (h, c) = ours(x.detach(), hx, lengths=lengths)
    for a, b in ((out, out_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    out_packed, (h2, _) = ours(packed, hx)
    torch.testing.assert_close(out_packed.data, ref(packed, hx)[0].data, **TOL[torch.float64])


def test_lstm_proj_size_token_ids_trace_and_generic_layer():
    torch.manual_seed(2)
    ref = torch.nn.LSTM(7, 6, proj_size=3, num_layers=2, bidirectional=True)
    ours = rnnmath.Recurrent(rnnmath.LSTMCell, 7, 6, num_layers=2, bidirectional=True, proj_size=3)
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 7, (5, 2))
    out, (h, c) = ours(ids)
    out_ref, (h_ref, c_ref) = ref(torch.nn.functional.one_hot(ids, 7).float())
    for a, b in ((out, out_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b)
    with rnnmath.trace(ours) as tr:
        traced, _ = ours(ids)
    assert torch.equal(traced, out)
    assert tr[0, 1]["h"].shape == (5, 2, 3) and tr[0, 1]["c"].shape == (5, 2, 6)
    assert "proj_size=3" in repr(ours)


def test_proj_size_rules_as_torch():
    assert rnnmath.RNN(3, 4).proj_size == 0 and rnnmath.GRU(3, 4).proj_size == 0 and rnnmath.LSTM(3, 4).proj_size == 0
    for cls in (rnnmath.RNN, rnnmath.GRU):
        with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
            cls(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        rnnmath.Recurrent(rnnmath.cells.PeepholeLSTMCell, 3, 4, proj_size=2)
    with pytest.raises(ValueError, match="smaller than hidden_size"):
        rnnmath.LSTM(3, 4, proj_size=4)
    with pytest.raises(ValueError, match="positive integer or zero"):
        rnnmath.LSTM(3, 4, proj_size=-1)
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 2, 2\)"):  # h0 must be (L·D, B, P)
        rnnmath.LSTM(3, 4, proj_size=2)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))


# -- point 2: every autograd mode on the default layer (layer.fast untouched) ------------------------------
def _pair(name, **kwargs):
    torch.manual_seed(3)
    ref = getattr(torch.nn, name)(3, 4, **kwargs).double()
    ours = getattr(rnnmath, name)(3, 4, **kwargs).double()
    ours.load_state_dict(ref.state_dict())
    assert ours.fast
    return ref, ours


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_double_backward_gradient_penalty_matches_torch(name):
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for m in _pair(name, num_layers=2, bidirectional=True):
        (g,) = torch.autograd.grad(m(x)[0].pow(2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(g.pow(2).sum(), [x, *m.parameters()]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_is_grads_batched_matches_torch(name):
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for m in _pair(name):
        out = m(x)[0]
        v = torch.randn(4, *out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        results.append(torch.autograd.grad(out, [x, *m.parameters()], v, is_grads_batched=True))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_forward_mode_ad_matches_torch(name):
    """forward_ad dual tensors and torch.func.jvp, in the input and in a parameter."""
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    v = torch.randn_like(x)
    lengths = torch.tensor([5, 3])
    tangents = []
    for m in _pair(name, bidirectional=True):
        with fwAD.dual_level():
            out = m(fwAD.make_dual(x, v))[0]
            tangents.append(fwAD.unpack_dual(out).tangent)
        params = dict(m.named_parameters())
        w = params["weight_hh_l0"]
        def f(w_, m=m, params=params):
            return torch.func.functional_call(m, {**params, "weight_hh_l0": w_}, (x,))[0]

        _, t = torch.func.jvp(f, (w.detach(),), (torch.ones_like(w),))
        tangents.append(t)
    torch.testing.assert_close(tangents[0], tangents[2], **TOL[torch.float64])
    torch.testing.assert_close(tangents[1], tangents[3], **TOL[torch.float64])
    _, ours = _pair(name)
    with fwAD.dual_level():  # with lengths too (torch.nn has no lengths=): against the readable loop's vjp
        out = ours(fwAD.make_dual(x, v), lengths=lengths)[0]
        jvp = fwAD.unpack_dual(out).tangent
    jac = torch.autograd.functional.jacobian(lambda x_: ours(x_, lengths=lengths)[0], x)
    torch.testing.assert_close(jvp, (jac.flatten(3) @ v.flatten()).view_as(jvp), **TOL[torch.float64])


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_torch_func_transforms(name):
    """grad, jacrev and vmap(grad) (per-sample gradients, where torch.nn's layers fail) as plain autograd."""
    ref, ours = _pair(name)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    params = {n: p.detach() for n, p in ours.named_parameters()}

    def loss(p, x_):
        return torch.func.functional_call(ours, p, (x_,))[0].pow(2).sum()

    g = torch.func.grad(loss)(params, x)
    ours.zero_grad()
    loss(dict(ours.named_parameters()), x).backward()
    for n, p in ours.named_parameters():
        torch.testing.assert_close(g[n], p.grad, **TOL[torch.float64])
    jac = torch.func.jacrev(lambda x_: ours(x_)[0])(x)
    jac_ref = torch.func.jacrev(lambda x_: ref(x_)[0])(x)
    torch.testing.assert_close(jac, jac_ref, **TOL[torch.float64])
    torch.testing.assert_close(torch.func.jacfwd(lambda x_: ours(x_)[0])(x), jac_ref, **TOL[torch.float64])
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 1))(params, x)  # unbatched samples (T, I)
    for b in range(2):
        one = torch.func.grad(loss)(params, x[:, b])
        for n in params:
            torch.testing.assert_close(per_sample[n][b], one[n], **TOL[torch.float64])


# -- point 3: mixed precision -----------------------------------------------------------------------------
AUTOCAST_CASES = [("RNN", torch.bfloat16), ("LSTM", torch.bfloat16), ("GRU", torch.bfloat16),
                  ("RNN", torch.float16), ("GRU", torch.float16),
                  ("RNNCell", torch.bfloat16), ("LSTMCell", torch.bfloat16), ("GRUCell", torch.bfloat16),
                  ("RNNCell", torch.float16), ("LSTMCell", torch.float16), ("GRUCell", torch.float16)]


@pytest.mark.parametrize("name,dtype", AUTOCAST_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in AUTOCAST_CASES])
def test_autocast_returns_what_torch_returns(name, dtype):
    """Same dtypes as torch.nn under CPU autocast (RNN/LSTM in the lower precision, GRU and cells in float32),
    values within the lower precision's tolerance, and gradients that reach the float32 parameters."""
    torch.manual_seed(4)
    ref, ours = getattr(torch.nn, name)(6, 5), getattr(rnnmath, name)(6, 5)
    ours.load_state_dict(ref.state_dict())
    cell = name.endswith("Cell")
    x = torch.randn(2, 6) if cell else torch.randn(4, 2, 6)
    h = torch.randn(2, 5) if cell else torch.randn(1, 2, 5)
    hx = (h, torch.randn_like(h)) if "LSTM" in name else h  # float32 states, as a user would pass
    with torch.autocast("cpu", dtype=dtype):
        want, got = tensors_of(ref(x, hx)), tensors_of(ours(x, hx))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    weighted_loss([g.float() for g in got]).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())


def test_autocast_float16_lstm_is_a_deviation():
    """torch.nn.LSTM fails under CPU float16 autocast (oneDNN); rnnmath runs it in float16, close to float32."""
    torch.manual_seed(4)
    ours = rnnmath.LSTM(6, 5)
    x = torch.randn(4, 2, 6)
    with torch.autocast("cpu", dtype=torch.float16):
        out, (h, c) = ours(x)
    assert out.dtype == h.dtype == c.dtype == torch.float16
    torch.testing.assert_close(out.float(), ours(x)[0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_low_and_double_precision_modules(name, dtype):
    torch.manual_seed(5)
    ours = getattr(rnnmath, name)(6, 5, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 6)
    want = ours(x, lengths=torch.tensor([4, 2]))[0]
    low = copy.deepcopy(ours).to(dtype)
    out = low(x.to(dtype), lengths=torch.tensor([4, 2]))[0]
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float64 else 3e-2  # against the float32 module
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)
    out.float().sum().backward()
    assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in low.parameters())


# -- point 4: validation like torch.nn ---------------------------------------------------------------------
BAD_CONSTRUCTORS = [
    ("batch_first='False'", dict(batch_first="False")), ("bias=0", dict(bias=0)), ("bias='True'", dict(bias="True")),
    ("input_size=3.0", dict(input_size=3.0)), ("hidden_size=5.0", dict(hidden_size=5.0)),
    ("input_size=-1", dict(input_size=-1)), ("input_size=0", dict(input_size=0)),
    ("hidden_size=0", dict(hidden_size=0)),
    ("num_layers=0", dict(num_layers=0)), ("dropout=1.5", dict(dropout=1.5)), ("dropout='0.1'", dict(dropout="0.1")),
    ("dropout=True", dict(dropout=True)), ("num_layers=1.5", dict(num_layers=1.5)),
]


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("label,change", BAD_CONSTRUCTORS, ids=[b[0] for b in BAD_CONSTRUCTORS])
def test_bad_constructor_arguments_raise_like_torch(name, label, change):
    kwargs = {"input_size": 3, "hidden_size": 5, **change}
    with pytest.raises(Exception) as want, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(torch.nn, name)(**kwargs)
    with pytest.raises(want.type) as got, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(rnnmath, name)(**kwargs)
    argument = label.split("=")[0]
    assert argument in str(got.value), str(got.value)


def test_unknown_nonlinearity_and_dropout_warning():
    for cls in (rnnmath.RNN, rnnmath.RNNCell):
        with pytest.raises(ValueError, match="Unknown nonlinearity 'sigmoid'"):
            cls(3, 5, nonlinearity="sigmoid")
    for name in ("RNN", "LSTM", "GRU"):
        with pytest.warns(UserWarning, match="num_layers greater than 1") as ours:
            getattr(rnnmath, name)(3, 5, dropout=0.5)
        assert ours[0].filename == __file__  # points at the caller, as torch's does
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnnmath.GRU(3, 5, num_layers=2, dropout=0.5)


def _raises_like_torch(name, constructor, *args):
    """The call raises in torch.nn and in rnnmath with the same exception type; returns rnnmath's message."""
    torch.manual_seed(0)
    ref, ours = getattr(torch.nn, name)(*constructor), getattr(rnnmath, name)(*constructor)
    with pytest.raises(Exception) as want:
        ref(*args)
    with pytest.raises(want.type) as got:
        ours(*args)
    return str(got.value)


@pytest.mark.parametrize("name", ["RNN", "GRU"])
def test_bad_layer_inputs_raise_like_torch(name):
    x = torch.randn(5, 2, 3)
    assert "input_size" in _raises_like_torch(name, (3, 4), torch.randn(5, 2, 4))
    assert "2D or 3D" in _raises_like_torch(name, (3, 4), torch.randn(5, 2, 3, 1))
    assert "(1, 2, 4)" in _raises_like_torch(name, (3, 4), x, torch.randn(1, 3, 4))  # wrong batch: no broadcast
    assert "(1, 2, 4)" in _raises_like_torch(name, (3, 4), x, torch.randn(2, 2, 4))
    assert "3-D" in _raises_like_torch(name, (3, 4), x, torch.randn(2, 4))
    assert "2-D" in _raises_like_torch(name, (3, 4), torch.randn(5, 3), torch.randn(1, 2, 4))
    assert "dtype" in _raises_like_torch(name, (3, 4), x.double())
    assert "dtype" in _raises_like_torch(name, (3, 4), x, torch.randn(1, 2, 4).double())


def test_bad_lstm_hx_raises_like_torch_where_torch_means_it():
    x = torch.randn(5, 2, 3)
    assert "(1, 2, 4)" in _raises_like_torch("LSTM", (3, 4), x, (torch.randn(1, 2, 4), torch.randn(1, 3, 4)))
    # torch.nn fails on a 1-tuple or a bare tensor with an IndexError from inside; rnnmath says what it expected
    for hx in ((torch.randn(1, 2, 4),), torch.randn(1, 2, 4)):
        with pytest.raises(ValueError, match=r"hx must be 2 tensor\(s\) \('h', 'c'\)"):
            rnnmath.LSTM(3, 4)(x, hx)


@pytest.mark.parametrize("name", ["RNNCell", "GRUCell", "LSTMCell"])
def test_cells_check_hx_rank_and_batch_and_never_broadcast(name):
    lstm = name == "LSTMCell"

    def state(*shape):
        return (torch.randn(*shape), torch.randn(*shape)) if lstm else torch.randn(*shape)

    assert "batch size" in _raises_like_torch(name, (3, 4), torch.randn(5, 3), state(1, 4))  # issue 11's input
    assert "batch size" in _raises_like_torch(name, (3, 4), torch.randn(5, 3), state(2, 4))
    assert "hidden_size" in _raises_like_torch(name, (3, 4), torch.randn(5, 3), state(5, 6))
    assert "input_size" in _raises_like_torch(name, (3, 4), torch.randn(5, 2), state(5, 4))
    assert "1D or 2D" in _raises_like_torch(name, (3, 4), torch.randn(5, 3), state(5, 1, 1, 4))
    assert "1D or 2D" in _raises_like_torch(name, (3, 4), torch.randn(5, 3, 2))
    assert "dtype" in _raises_like_torch(name, (3, 4), torch.randn(5, 3).double())


@pytest.mark.parametrize("name", ["RNNCell", "GRUCell", "LSTMCell"])
def test_cells_accept_zero_sizes_as_torch(name):
    for sizes in ((3, 0), (0, 4)):
        torch.manual_seed(0)
        ref, ours = getattr(torch.nn, name)(*sizes), getattr(rnnmath, name)(*sizes)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(2, sizes[0])
        for a, b in zip(tensors_of(ours(x)), tensors_of(ref(x))):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b)
    for bad in ((3.0, 4), (3, "4")):
        with pytest.raises(TypeError, match="should be of type int"):
            getattr(rnnmath, name)(*bad)
    with pytest.raises(RuntimeError, match="hidden_size must be zero or positive"):
        getattr(rnnmath, name)(3, -1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"])
def test_token_ids_of_every_integer_dtype(name, dtype):
    """Token ids are one-hot over input_size words: any integer dtype, as a lookup of W_ih's columns."""
    torch.manual_seed(6)
    vocab = 100 if dtype in (torch.int8, torch.uint8) else 256
    cell = name.endswith("Cell")
    ref, ours = getattr(torch.nn, name)(vocab, 8), getattr(rnnmath, name)(vocab, 8)
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(0, vocab, (2,) if cell else (7, 2)).to(dtype)
    got = tensors_of(ours(ids))
    want = tensors_of(ref(torch.nn.functional.one_hot(ids.long(), vocab).float()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_bool_or_complex_input_is_refused():
    with pytest.raises(ValueError, match="neither floating point nor token ids"):
        rnnmath.GRU(3, 4)(torch.zeros(5, 2, dtype=torch.bool))


# -- point 5: padding never leaks --------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "loop"])
@pytest.mark.parametrize("cell", sorted(rnnmath.CELLS))
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 0.0], ids=["nan", "inf", "zero"])
def test_padding_never_leaks(cell, fast, fill):
    """Whatever the padded steps hold, outputs, states and every gradient equal those of each sequence run
    alone, cut to its length (no 0 × NaN in any masked product), on both paths, for every cell."""
    torch.manual_seed(7)
    layer = rnnmath.Recurrent(rnnmath.CELLS[cell], 3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    layer.fast = fast
    lengths = torch.tensor([5, 2, 3])
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    for b, n in enumerate(lengths):
        x[n:, b] = fill
    x.requires_grad_()
    output, h_n = layer(x, lengths=lengths)
    finals = tensors_of(h_n)
    g = torch.Generator().manual_seed(0)
    w_out = torch.randn(output.shape, generator=g, dtype=torch.float64)
    w_fin = [torch.randn(f.shape, generator=g, dtype=torch.float64) for f in finals]
    loss = (output * w_out).sum() + sum((f * w).sum() for f, w in zip(finals, w_fin))
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    assert all(torch.isfinite(t).all() for t in (output, *finals, *grads))
    assert (output[lengths.max():] == 0).all() and (grads[0][4:, 1] == 0).all()
    alone = [torch.zeros_like(p) for p in layer.parameters()]
    for b, n in enumerate(lengths.tolist()):
        xb = x.detach()[:n, b : b + 1].clone().requires_grad_()
        out_b, h_b = layer(xb)
        torch.testing.assert_close(out_b, output[:n, b : b + 1], **TOL[torch.float64])
        torch.testing.assert_close(output[n:, b], torch.zeros_like(output[n:, b]))
        fin_b = tensors_of(h_b)
        for f, fb in zip(finals, fin_b):
            torch.testing.assert_close(fb, f[:, b : b + 1], **TOL[torch.float64])
        loss_b = (out_b * w_out[:n, b : b + 1]).sum() + sum((fb * w[:, b : b + 1]).sum() for fb, w in zip(fin_b, w_fin))
        gb = torch.autograd.grad(loss_b, [xb, *layer.parameters()])
        torch.testing.assert_close(gb[0], grads[0][:n, b : b + 1], **TOL[torch.float64])
        alone = [a + gp for a, gp in zip(alone, gb[1:])]
    for a, gp in zip(alone, grads[1:]):
        torch.testing.assert_close(gp, a, **TOL[torch.float64])


def test_padding_token_ids_outside_the_vocabulary_are_never_read():
    torch.manual_seed(7)
    layer = rnnmath.GRU(10, 4, bidirectional=True)
    ids = torch.randint(0, 10, (6, 2))
    padded = ids.clone()
    padded[3:, 1] = -100  # an ignore index as padding
    out, h = layer(padded, lengths=torch.tensor([6, 3]))
    want, h_want = layer(ids[:3, 1:])
    torch.testing.assert_close(out[:3, 1:], want)
    torch.testing.assert_close(h[:, 1:], h_want)
    with pytest.raises(ValueError, match="token ids must lie in"):  # inside a sequence it is still an error
        layer(padded)


def test_per_sample_gradients_over_lengths_with_vmap():
    """torch.func.vmap(grad(...)) over samples, each with its own length: equal to one call per sample."""
    torch.manual_seed(8)
    layer = rnnmath.LSTM(3, 4, bidirectional=True, batch_first=True, dtype=torch.float64)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    x = torch.randn(3, 5, 3, dtype=torch.float64)  # (B, T, I)
    lengths = torch.tensor([5, 2, 4])
    x[1, 2:] = float("nan")

    def loss(p, x_, n):
        out, (h, c) = torch.func.functional_call(layer, p, (x_,), {"lengths": n})
        return out.pow(2).sum() + h.sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, lengths)
    for b in range(3):
        n = int(lengths[b])
        one = torch.func.grad(loss)(params, x[b, :n], torch.tensor(n))
        for name in params:
            assert torch.isfinite(per_sample[name][b]).all()
            torch.testing.assert_close(per_sample[name][b], one[name], **TOL[torch.float64])


# -- point 6: tools --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "loop"])
def test_jit_trace_refuses_rather_than_fix_the_length(name, fast):
    """Issue 11: a trace at T=6 called at T=9 gave 6 steps. A trace would unroll the loop, so it is refused."""
    layer = getattr(rnnmath, name)(3, 4)
    layer.fast = fast
    with pytest.raises(RuntimeError, match="torch.jit.trace cannot record rnnmath"):
        torch.jit.trace(layer, torch.randn(6, 2, 3))


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_jit_trace_of_a_cell_is_right_at_other_batch_sizes(name):
    """A cell has no loop over time: its trace holds at any batch size, with hx or without."""
    torch.manual_seed(9)
    cell = getattr(rnnmath, name)(3, 4)
    lstm = name == "LSTMCell"

    def state(b):
        return (torch.randn(b, 4), torch.randn(b, 4)) if lstm else torch.randn(b, 4)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bare = torch.jit.trace(cell, (torch.randn(2, 3),))
        with_hx = torch.jit.trace(cell, (torch.randn(2, 3), state(2)))
    x, hx = torch.randn(5, 3), state(5)
    for got, want in ((bare(x), cell(x)), (with_hx(x, hx), cell(x, hx))):
        for a, b in zip(tensors_of(got), tensors_of(want)):
            assert a.shape == (5, 4)
            torch.testing.assert_close(a, b)


def test_quantize_dynamic_leaves_rnnmath_layers_in_float():
    """quantize_dynamic swaps torch.nn.LSTM/GRU/Linear by type; rnnmath's layers are not among them and stay
    float (docs/compatibility.md says so), with unchanged results."""
    torch.manual_seed(9)
    model = torch.nn.Sequential()
    model.add_module("rnn", rnnmath.LSTM(3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.LSTM, torch.nn.GRU}, dtype=torch.qint8)
    assert type(quantized.rnn) is rnnmath.LSTM
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(quantized(x)[0], model(x)[0])


def test_compatibility_page_names_every_torch_nn_argument():
    """docs/compatibility.md lists every constructor argument of torch.nn's RNN layers and cells."""
    import inspect
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "compatibility.md").read_text()
    for base in (torch.nn.modules.rnn.RNNBase, torch.nn.modules.rnn.RNNCellBase):
        for name in inspect.signature(base.__init__).parameters:
            if name not in ("self", "mode", "num_chunks"):
                assert f"`{name}`" in page or f", {name}" in page or f"({name}" in page, name


# -- issue 11's failing inputs, each as it was reported -------------------------------------------------------
def test_issue_lstm_proj_size_constructs():
    layer = rnnmath.LSTM(10, 20, proj_size=5)
    out, (h, c) = layer(torch.randn(4, 3, 10))
    assert out.shape == (4, 3, 5) and h.shape == (1, 3, 5) and c.shape == (1, 3, 20)


def test_issue_double_backward_of_a_default_gru():
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    out, _ = rnnmath.GRU(4, 6).double()(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert g.shape == gg.shape == x.shape and gg.abs().sum() > 0


def test_issue_gru_under_bfloat16_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h = rnnmath.GRU(6, 5)(torch.randn(4, 2, 6))
    assert out.dtype == h.dtype == torch.float32  # as torch.nn.GRU


def test_issue_gru_cell_refuses_a_state_of_another_batch():
    with pytest.raises(RuntimeError, match="Input batch size 5 doesn't match hidden0"):
        rnnmath.GRUCell(3, 4)(torch.randn(5, 3), torch.randn(1, 4))


def test_issue_nan_padding_gives_finite_weight_gradients():
    layer = rnnmath.GRU(3, 4)
    x = torch.randn(6, 2, 3)
    x[3:, 1] = float("nan")
    out, h = layer(x, lengths=torch.tensor([6, 3]))
    (out.sum() + h.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_issue_uint8_token_ids():
    out, h = rnnmath.GRU(256, 8)(torch.randint(0, 256, (7, 2), dtype=torch.uint8))
    assert out.shape == (7, 2, 8)


def test_issue_batch_first_string_is_refused():
    with pytest.raises(TypeError, match="batch_first should be of type bool, got: str"):
        rnnmath.GRU(3, 5, batch_first="False")


def test_issue_jit_trace_of_the_readable_loop():
    layer = rnnmath.GRU(3, 4)
    layer.fast = False
    with pytest.raises(RuntimeError, match="silently wrong shapes"):
        torch.jit.trace(layer, torch.randn(6, 2, 3))


# -- the outside tester's findings (after the first round) -------------------------------------------------
AUTOCAST_MATRIX = [(name, ac, xd, form)
                   for name in ("RNN", "LSTM", "GRU", "LSTMproj", "RNNCell", "LSTMCell", "GRUCell")
                   for ac in (torch.bfloat16, torch.float16)
                   for xd in (torch.float32, torch.bfloat16, torch.float16)
                   for form in (("plain", "packed") if not name.endswith("Cell") else ("plain",))]


def _build_twins(name):
    torch.manual_seed(8)
    kwargs = dict(proj_size=2) if name == "LSTMproj" else {}
    cls = "LSTM" if name == "LSTMproj" else name
    ref, ours = getattr(torch.nn, cls)(6, 5, **kwargs), getattr(rnnmath, cls)(6, 5, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("name,ac,xd,form", AUTOCAST_MATRIX,
                         ids=[f"{n}-{str(a)[6:]}-x{str(x)[6:]}-{f}" for n, a, x, f in AUTOCAST_MATRIX])
def test_autocast_dtypes_of_every_input_dtype_match_torch(name, ac, xd, form):
    """Findings 1-3: under autocast torch.nn skips its dtype check and returns, per class, input dtype and
    packing, the dtypes its kernels give (GRU/GRUCell/LSTMCell with an input already in the autocast dtype: that
    dtype; LSTM with proj_size: h in the autocast dtype, c_n float32; packed LSTM: float32). rnnmath returns the
    same dtypes with values within the lower precision's tolerance, wherever torch.nn runs at all."""
    ref, ours = _build_twins(name)
    cell = name.endswith("Cell")
    x = (torch.randn(3, 6) if cell else torch.randn(5, 3, 6)).to(xd)
    if form == "packed":
        x = pack_padded_sequence(x, torch.tensor([5, 4, 2]))
    with torch.autocast("cpu", dtype=ac):
        try:
            want = ref(x)
        except RuntimeError:
            want = None  # torch.nn's oneDNN LSTM under float16 autocast, or packing mixed halves: a deviation
        if want is None:
            pytest.skip("torch.nn raises here (docs/compatibility.md, Precision)")
        got = ours(x)
    for a, b in zip(tensors_of(got), tensors_of(want)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU", "LSTMproj"])
@pytest.mark.parametrize("ac", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_autocast_dtypes_of_an_empty_batch_match_torch(name, ac):
    """An empty batch under autocast: torch.nn.LSTM's empty input skips oneDNN (ATen's use_mkldnn asks for
    input.numel() != 0) and promotes, float32 where a full batch gives the autocast dtype."""
    ref, ours = _build_twins(name)
    x = torch.randn(5, 0, 6)
    with torch.autocast("cpu", dtype=ac):
        try:
            want = ref(x)
        except RuntimeError:
            pytest.skip("torch.nn raises here (docs/compatibility.md, Precision)")
        got = ours(x)
    assert [t.dtype for t in tensors_of(got)] == [t.dtype for t in tensors_of(want)]
    assert [t.shape for t in tensors_of(got)] == [t.shape for t in tensors_of(want)]


@pytest.mark.parametrize("ac", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("xd", [torch.float32, torch.bfloat16, torch.float16], ids=["xfloat32", "xbfloat16",
                                                                                   "xfloat16"])
def test_autocast_lstm_without_gradients_follows_torchs_onednn_choice(ac, xd):
    """Without gradients torch.nn.LSTM also takes oneDNN for a float16 input where the CPU has it (ATen's
    use_mkldnn), and then returns the autocast dtype, not the promotion: CI's CPU showed the same for a bfloat16
    input under float16 autocast, which this CPU's oneDNN refuses."""
    ref, ours = _build_twins("LSTM")
    x = torch.randn(5, 3, 6).to(xd)
    with torch.no_grad(), torch.autocast("cpu", dtype=ac):
        try:
            want = ref(x)
        except RuntimeError:
            pytest.skip("torch.nn raises here (docs/compatibility.md, Precision)")
        got = ours(x)
    for a, b in zip(tensors_of(got), tensors_of(want)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name,ac,xd", [(n, a, x) for n in ("RNN", "LSTM", "GRU", "LSTMproj")
                                         for a in (torch.bfloat16, torch.float16)
                                         for x in (torch.float32, torch.bfloat16, torch.float16)])
def test_backward_inside_the_autocast_block_gives_torchs_gradients(name, ac, xd):
    """loss.backward() called inside ``torch.autocast`` (an outside tester's finding: the hand-written backward's
    products were cast and the in-place ones failed, "self and mat2 must have the same dtype")."""
    ref, ours = _build_twins(name)
    grads = []
    for model in (ref, ours):
        x = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(3)).to(xd).requires_grad_()
        with torch.autocast("cpu", dtype=ac):
            try:
                output = model(x)[0]
            except RuntimeError:
                pytest.skip("torch.nn raises here (docs/compatibility.md, Precision)")
            output.float().sum().backward()
        grads.append([x.grad, *(q.grad for q in model.parameters())])
    for a, b in zip(*grads, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"])
def test_autocast_leaves_float64_alone_as_torch_does(name):
    """Autocast casts no float64: a float64 model on float64 input stays float64, and a float64 input to a
    float32 model fails on the input projection, with torch.nn's error."""
    x = torch.randn(3, 6, dtype=torch.float64) if name.endswith("Cell") else torch.randn(5, 3, 6, dtype=torch.float64)
    for ac in (torch.bfloat16, torch.float16):
        ref, ours = _build_twins(name)
        ref, ours = ref.double(), ours.double()
        with torch.autocast("cpu", dtype=ac):
            for a, b in zip(tensors_of(ours(x)), tensors_of(ref(x)), strict=True):
                assert a.dtype == b.dtype == torch.float64
                torch.testing.assert_close(a, b)
            for model in _build_twins(name):
                with pytest.raises(RuntimeError, match="mat1 and mat2 must have the same dtype, but got Double"):
                    model(x)


def test_finding1_gru_and_cells_under_autocast_keep_a_half_input():
    x = torch.randn(5, 2, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h = rnnmath.GRU(3, 4)(x)
        assert out.dtype == h.dtype == torch.bfloat16
        assert rnnmath.GRUCell(3, 4)(x[0]).dtype == torch.bfloat16
        assert {t.dtype for t in rnnmath.LSTMCell(3, 4)(x[0])} == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.float16):
        out, h = rnnmath.GRU(3, 4)(x.half())
        assert out.dtype == h.dtype == torch.float16
        assert rnnmath.GRUCell(3, 4)(x[0].half()).dtype == torch.float16
    with pytest.raises(ValueError, match="does not match weight dtype"):  # outside autocast: still refused
        rnnmath.GRU(3, 4)(x)


def test_finding2_lstm_proj_size_under_autocast_keeps_c_in_float32():
    for ac in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=ac):
            out, (h, c) = rnnmath.LSTM(3, 4, proj_size=2, num_layers=2)(torch.randn(5, 2, 3))
        assert out.dtype == h.dtype == ac and c.dtype == torch.float32


def test_finding3_packed_lstm_under_autocast_stays_float32():
    x = pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 3]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = rnnmath.LSTM(3, 4)(x)
        rnn_out, rnn_h = rnnmath.RNN(3, 4)(x)
    assert out.data.dtype == h.dtype == c.dtype == torch.float32
    assert rnn_out.data.dtype == rnn_h.dtype == torch.bfloat16  # torch.nn.RNN packed: the lower precision


@pytest.mark.parametrize("name", ["RNNCell", "GRUCell", "LSTMCell"])
@pytest.mark.parametrize("label,x", [("bool-2d", torch.zeros(5, 3, dtype=torch.bool)),
                                     ("complex64-2d", torch.zeros(5, 3, dtype=torch.complex64)),
                                     ("int64-2d", torch.zeros(5, 3, dtype=torch.int64)),
                                     ("bool-1d", torch.zeros(3, dtype=torch.bool)),
                                     ("complex64-1d", torch.zeros(3, dtype=torch.complex64))])
def test_finding5_cells_refuse_bool_complex_and_2d_integer_input_as_torch(name, label, x):
    assert "mat1 and mat2 must have the same dtype" in _raises_like_torch(name, (3, 4), x)


def test_finding6_lstm_cell_hx_not_a_pair_raises_like_torch():
    x, h = torch.randn(5, 3), torch.zeros(5, 4)
    assert "tuple of 2 tensors" in _raises_like_torch("LSTMCell", (3, 4), x, h)  # TypeError
    assert "expects 2 hidden states" in _raises_like_torch("LSTMCell", (3, 4), x, (h,))  # RuntimeError
    assert "expects 2 hidden states" in _raises_like_torch("LSTMCell", (3, 4), x, [h])


def test_finding7_unknown_cell_nonlinearity_fails_at_construction_a_deviation():
    with pytest.raises(RuntimeError, match="Unknown nonlinearity"):  # torch.nn: at the first call
        torch.nn.RNNCell(3, 4, nonlinearity="gelu")(torch.randn(2, 3))
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):  # rnnmath: at once, as torch.nn.RNN
        rnnmath.RNNCell(3, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        torch.nn.RNN(3, 4, nonlinearity="gelu")


@pytest.mark.parametrize("name", ["RNNCell", "GRUCell", "LSTMCell"])
def test_finding8_a_bool_size_is_refused_by_cells_as_by_layers_a_deviation(name):
    getattr(torch.nn, name)(3, True)  # torch.nn reads True as 1
    with pytest.raises(TypeError, match="hidden_size should be of type int, got: bool"):
        getattr(rnnmath, name)(3, True)


@pytest.mark.parametrize("name", ["RNN", "GRU"])
def test_finding9_layer_hx_containers_raise_like_torch(name):
    x, h = torch.randn(5, 2, 3), torch.zeros(1, 2, 4)
    for hx in ([h], (h,), (h, h)):
        assert "hx must be a tensor" in _raises_like_torch(name, (3, 4), x, hx)  # AttributeError
    for hx in ([h[0]], (h[0],)):  # unbatched input
        assert "hx must be a tensor" in _raises_like_torch(name, (3, 4), x[:, 0], hx)


@pytest.mark.parametrize("name", ["RNNCell", "GRUCell"])
def test_finding9_cell_hx_containers_raise_like_torch(name):
    x, h = torch.randn(5, 3), torch.zeros(5, 4)
    for hx in ([h], (h,), (h, h)):
        assert "hx must be a tensor" in _raises_like_torch(name, (3, 4), x, hx)  # AttributeError


def test_finding9_packed_lstm_with_2d_hx_is_a_runtime_error_a_deviation():
    x = pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 3]))
    hx = (torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(IndexError):  # torch.nn: from inside, "Dimension out of range"
        torch.nn.LSTM(3, 4)(x, hx)
    with pytest.raises(RuntimeError, match="hx should also be 3-D"):  # as torch.nn.RNN/GRU say for it
        rnnmath.LSTM(3, 4)(x, hx)


def test_finding10_proj_size_message_is_torchs():
    for name in ("RNN", "GRU"):
        with pytest.raises(ValueError) as ours:
            getattr(rnnmath, name)(4, 6, proj_size=2)
        with pytest.raises(ValueError) as ref:
            getattr(torch.nn, name)(4, 6, proj_size=2)
        assert str(ours.value) == str(ref.value)
    with pytest.raises(ValueError, match="not PeepholeLSTMCell"):
        rnnmath.Recurrent(rnnmath.cells.PeepholeLSTMCell, 3, 4, proj_size=2)


@pytest.mark.parametrize("name,args,kwargs", [
    ("LSTM", (3, 4), dict(num_layers=2, bidirectional=True, proj_size=2)),
    ("LSTM", (3, 5), dict(num_layers=2, batch_first=True, dropout=0.1, bidirectional=True)),
    ("LSTM", (3, 5), dict(bias=False, proj_size=1)),
    ("RNN", (3, 4), dict(nonlinearity="relu", num_layers=3)),
    ("GRU", (3, 4), dict(bias=False, batch_first=True)),
    ("RNNCell", (3, 4), dict(nonlinearity="relu")),
    ("RNNCell", (3, 4), dict(bias=False, nonlinearity="relu")),
    ("LSTMCell", (3, 4), dict(bias=False)),
    ("GRUCell", (3, 4), {}),
])
def test_finding11_repr_is_torchs(name, args, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert repr(getattr(rnnmath, name)(*args, **kwargs)) == repr(getattr(torch.nn, name)(*args, **kwargs))


def test_finding12_not_torch_nn_subclasses_as_documented():
    """rnnmath's classes are nn.Modules but not torch.nn.RNNBase/RNNCellBase (docs/compatibility.md says so)."""
    assert isinstance(rnnmath.LSTM(3, 4), torch.nn.Module)
    assert not isinstance(rnnmath.LSTM(3, 4), torch.nn.RNNBase)
    assert not isinstance(rnnmath.GRUCell(3, 4), torch.nn.RNNCellBase)


def test_the_cells_own_state_tuple_is_accepted_as_hx_an_extension():
    """A plain tuple or list raises as in torch.nn, but the State a step returns (HiddenState(h)) goes back in."""
    cell, x = rnnmath.GRUCell(3, 4), torch.randn(5, 3)
    h = cell(x)
    torch.testing.assert_close(cell(x, rnnmath.cells.HiddenState(h)), cell(x, h))
    layer = rnnmath.GRU(3, 4)
    h0 = torch.randn(1, 5, 4)
    torch.testing.assert_close(layer(x[None], rnnmath.cells.HiddenState(h0))[0], layer(x[None], h0)[0])
