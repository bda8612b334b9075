"""The pure-PyTorch mLSTM forms: agreement with each other, state carrying, exact gradients, input checks."""

import pytest
import torch

from tfla import MLSTMState, mlstm

GATE_CASES = [("exp", True), ("sig", True), ("sig", False)]


def make_inputs(B=2, NH=3, S=37, DQK=8, DHV=5, dtype=torch.float64, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, NH, S, DQK, generator=g, dtype=dtype)
    k = torch.randn(B, NH, S, DQK, generator=g, dtype=dtype)
    v = torch.randn(B, NH, S, DHV, generator=g, dtype=dtype)
    # Spread-out gates exercise the stabiliser: strongly negative and positive input gates, varied forgetting.
    i = torch.randn(B, NH, S, generator=g, dtype=dtype) * 3
    f = torch.randn(B, NH, S, generator=g, dtype=dtype) * 2 + 2
    tensors = [q, k, v, i, f]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    return tensors


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("gate,normalize", GATE_CASES)
@pytest.mark.parametrize("S,chunk", [(1, 4), (17, 5), (37, 7), (63, 64), (64, 16)])
def test_all_forms_agree(gate, normalize, S, chunk):
    x = make_inputs(S=S)
    kw = dict(gate=gate, normalize=normalize, return_state=True)
    h_par, st_par = mlstm(*x, backend="parallel", **kw)
    h_chk, st_chk = mlstm(*x, backend="chunkwise", chunk_size=chunk, **kw)
    h_rec, st_rec = mlstm(*x, backend="recurrent", **kw)
    assert_close(h_chk, h_par)
    assert_close(h_rec, h_par)
    for a, b, c in zip(st_par, st_chk, st_rec):
        assert_close(b, a)
        assert_close(c, a)


@pytest.mark.parametrize("gate,normalize", GATE_CASES)
@pytest.mark.parametrize("backend", ["parallel", "chunkwise", "recurrent"])
def test_state_carries_across_calls(gate, normalize, backend):
    x = make_inputs(S=41)
    kw = dict(gate=gate, normalize=normalize, return_state=True)
    h_full, st_full = mlstm(*x, backend="parallel", **kw)
    first = [t[..., :19, :] if t.dim() == 4 else t[..., :19] for t in x]
    second = [t[..., 19:, :] if t.dim() == 4 else t[..., 19:] for t in x]
    h1, st1 = mlstm(*first, backend=backend, chunk_size=8, **kw)
    h2, st2 = mlstm(*second, backend=backend, chunk_size=8, initial_state=st1, **kw)
    assert_close(torch.cat([h1, h2], dim=-2), h_full)
    for a, b in zip(st2, st_full):
        assert_close(a, b)


def test_exp_gate_starts_from_minus_infinity_max_state():
    # h = C~q / (max(|q.n~|, 1) + eps * exp(m)) in unstabilised terms: m_0 = 0 instead of -inf raises m when the
    # input gates are very negative, and so changes h by ~eps relative; float64 resolves that.
    q, k, v, i, f = make_inputs(S=9)
    i = i - 30.0
    h = mlstm(q, k, v, i, f, backend="recurrent")
    zeros_state = MLSTMState(torch.zeros(2, 3, 8, 5, dtype=q.dtype), torch.zeros(2, 3, 8, dtype=q.dtype),
                             torch.zeros(2, 3, dtype=q.dtype))
    h_m0 = mlstm(q, k, v, i, f, backend="recurrent", initial_state=zeros_state)
    assert_close(h, mlstm(q, k, v, i, f, backend="parallel"))
    relative_change = ((h - h_m0).abs().max() / h.abs().max()).item()
    assert 1e-9 < relative_change < 1e-4


def test_sig_gate_without_normaliser_is_gated_linear_attention():
    q, k, v, i, f = make_inputs(S=13)
    h = mlstm(q, k, v, i, f, gate="sig", normalize=False)
    scale = q.shape[-1] ** -0.5
    log_forget = torch.nn.functional.logsigmoid(f).cumsum(-1)
    decay = torch.exp(log_forget[..., :, None] - log_forget[..., None, :]).tril()
    attn = (q * scale) @ (k * torch.sigmoid(i)[..., None]).transpose(-2, -1) * decay
    assert_close(h, attn @ v)


@pytest.mark.parametrize("gate,normalize", GATE_CASES)
@pytest.mark.parametrize("backend", ["parallel", "chunkwise", "recurrent"])
def test_gradcheck_float64(gate, normalize, backend):
    x = make_inputs(B=1, NH=2, S=6, DQK=3, DHV=2, requires_grad=True, seed=1)

    def fn(*args):
        return mlstm(*args, gate=gate, normalize=normalize, backend=backend, chunk_size=4)

    assert torch.autograd.gradcheck(fn, x)


@pytest.mark.parametrize("gate", ["exp", "sig"])
def test_gradcheck_through_initial_and_final_state(gate):
    g = torch.Generator().manual_seed(3)
    x = make_inputs(B=1, NH=1, S=5, DQK=3, DHV=2, requires_grad=True, seed=2)
    C0 = torch.randn(1, 1, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    n0 = torch.randn(1, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    m0 = torch.randn(1, 1, generator=g, dtype=torch.float64, requires_grad=gate == "exp")

    def fn(q, k, v, i, f, C0, n0, m0):
        h, (C, n, m) = mlstm(q, k, v, i, f, gate=gate, backend="chunkwise", chunk_size=2,
                             initial_state=(C0, n0, m0), return_state=True)
        return h, C, n

    assert torch.autograd.gradcheck(fn, (*x, C0, n0, m0))


def test_gradient_is_exact_through_the_normaliser():
    # A loss that is not scale-invariant per head: a kernel that treats the normaliser as a constant fails this.
    x = make_inputs(B=1, NH=1, S=8, DQK=4, DHV=3, requires_grad=True, seed=5)
    h = mlstm(*x, backend="parallel")
    (h.sum() ** 2).backward()
    auto = [t.grad.clone() for t in x]
    eps = 1e-6
    q, k, v, i, f = (t.detach() for t in x)
    for idx in range(5):
        for pos in range(3):
            bumped = [t.clone() for t in (q, k, v, i, f)]
            bumped[idx].view(-1)[pos] += eps
            hi = mlstm(*bumped).sum() ** 2
            bumped[idx].view(-1)[pos] -= 2 * eps
            lo = mlstm(*bumped).sum() ** 2
            numeric = (hi - lo) / (2 * eps)
            torch.testing.assert_close(auto[idx].view(-1)[pos], numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_compute_in_fp32(dtype):
    x64 = make_inputs(S=20)
    x = [t.to(dtype) for t in x64]
    h, (C, n, m) = mlstm(*x, return_state=True)
    assert h.dtype == dtype and C.dtype == n.dtype == m.dtype == torch.float32
    ref = mlstm(*[t.to(torch.float64) for t in x])
    tol = 1e-2 if dtype != torch.float32 else 1e-5
    torch.testing.assert_close(h.double(), ref, rtol=tol, atol=tol)


def test_meta_device_and_auto_backend():
    q = torch.empty(2, 4, 196, 96, device="meta")
    g = torch.empty(2, 4, 196, device="meta")
    h, state = mlstm(q, q, q, g, g, return_state=True)
    assert h.device.type == "meta" and h.shape == (2, 4, 196, 96)
    assert state.C.shape == (2, 4, 96, 96)
    long = torch.empty(1, 1, 2000, 16, device="meta")
    assert mlstm(long, long, long, long[..., 0], long[..., 0]).shape == (1, 1, 2000, 16)


def test_different_qk_and_v_head_dims():
    x = make_inputs(DQK=7, DHV=11, S=10)
    h, state = mlstm(*x, backend="chunkwise", chunk_size=3, return_state=True)
    assert h.shape == (2, 3, 10, 11) and state.C.shape == (2, 3, 7, 11)
    assert_close(h, mlstm(*x, backend="recurrent"))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda x: x.__setitem__(0, x[0][0]), "q must be"),
        (lambda x: x.__setitem__(1, x[1][..., :-1]), "k must have"),
        (lambda x: x.__setitem__(2, x[2][:, :, :-1]), "v must be"),
        (lambda x: x.__setitem__(3, x[3][..., :-1]), "i \\(gate"),
        (lambda x: x.__setitem__(4, x[4].unsqueeze(-1)), "f \\(gate"),
        (lambda x: x.__setitem__(2, x[2].float()), "share one dtype"),
        (lambda x: x.__setitem__(0, x[0].long()), "q has dtype"),
        (lambda x: x.__setitem__(2, x[2].to("meta")), "v is on meta"),
    ],
)
def test_bad_inputs_name_the_argument(mutate, match):
    x = make_inputs(S=5)
    mutate(x)
    with pytest.raises(ValueError, match=match):
        mlstm(*x)


def test_bad_options_are_refused():
    x = make_inputs(S=5)
    with pytest.raises(ValueError, match="gate must be"):
        mlstm(*x, gate="relu")
    with pytest.raises(ValueError, match="backend must be"):
        mlstm(*x, backend="cuda")
    with pytest.raises(ValueError, match="normalize=False"):
        mlstm(*x, gate="exp", normalize=False)
    with pytest.raises(ValueError, match="chunk_size"):
        mlstm(*x, backend="chunkwise", chunk_size=0)
    with pytest.raises(ValueError, match="initial_state.C"):
        mlstm(*x, initial_state=(torch.zeros(1), torch.zeros(1), torch.zeros(1)))
    with pytest.raises(ValueError, match="triton"):
        mlstm(*x, backend="triton")
