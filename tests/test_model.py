import pytest
import torch
import torch.nn.functional as F

from exaflop.config import load_config
from exaflop.lm.config import ModelConfig
from exaflop.lm.generate import filter_logits, generate
from exaflop.lm.model import LM


def test_preset_sizes():
    def params(preset):
        return sum(p.numel() for p in LM(load_config(preset).model).parameters())

    assert 1e6 <= params("lm-tiny") <= 3e6
    assert 13e6 <= params("lm-small") <= 15e6
    assert 120e6 <= params("lm-124m") <= 128e6


@pytest.mark.parametrize("extra", [{}, {"n_kv_head": 1}, {"n_experts": 4, "top_k": 2}, {"tie_embeddings": False}])
def test_kv_cache_matches_full_forward(extra):
    torch.manual_seed(0)
    m = LM(ModelConfig(n_layer=2, d_model=64, n_head=4, vocab_size=300, seq_len=32, **extra)).eval()
    x = torch.randint(0, 300, (3, 20))
    full, _ = m(x)
    cache = m.new_cache(3)
    out = []
    for chunk in (x[:, :7], x[:, 7:8], x[:, 8:20]):
        logits, _ = m(chunk, cache=cache)
        cache.lengths += chunk.shape[1]
        out.append(logits)
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_token_by_token_decode_matches_full_forward(dtype, n_kv_head):
    """One token at a time to near the context end: covers decode reading a prefix of the
    cache and (past a third of it) whole masked rows, with rows of different lengths."""
    torch.manual_seed(0)
    m = LM(ModelConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=n_kv_head, vocab_size=300, seq_len=32)).eval()
    x = torch.randint(0, 300, (2, 30))
    full, _ = m(x)
    m = m.to(dtype)
    cache = m.new_cache(2)
    starts = [3, 6]  # row 1 runs 3 tokens ahead of row 0
    for r, s in enumerate(starts):
        m(x[r:r + 1, :s], cache=cache, rows=torch.tensor([r]))
        cache.lengths[r] = s
    steps = []
    for t in range(0, 30 - max(starts)):
        tok = torch.stack([x[r, s + t] for r, s in enumerate(starts)])[:, None]
        logits, _ = m(tok, cache=cache)
        cache.lengths += 1
        steps.append(logits[:, 0].float())
    got = torch.stack(steps, 1)  # (2, steps, V)
    want = torch.stack([full[r, s:s + got.shape[1]] for r, s in enumerate(starts)])
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    torch.testing.assert_close(got, want, **tol)


def test_rows_of_different_lengths_share_a_cache():
    torch.manual_seed(0)
    m = LM(ModelConfig(n_layer=2, d_model=64, n_head=4, vocab_size=300, seq_len=32)).eval()
    a, b = torch.randint(0, 300, (1, 9)), torch.randint(0, 300, (1, 4))
    cache = m.new_cache(2)
    m(a, cache=cache, rows=torch.tensor([0]))
    cache.lengths[0] += 9
    m(b, cache=cache, rows=torch.tensor([1]))
    cache.lengths[1] += 4
    nxt = torch.randint(0, 300, (2, 1))
    step, _ = m(nxt, cache=cache, rows=torch.tensor([0, 1]))
    ref_a, _ = m(torch.cat([a, nxt[:1]], 1))
    ref_b, _ = m(torch.cat([b, nxt[1:]], 1))
    torch.testing.assert_close(step[0, -1], ref_a[0, -1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step[1, -1], ref_b[0, -1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("extra", [{}, {"n_kv_head": 1}, {"n_experts": 4, "top_k": 2}])
def test_decode_entry_point_matches_the_full_forward_at_every_position(extra):
    """`LM.decode`, the one entry point serving and sampling use: right-padded prompts of
    different lengths in one call, then chunks and single tokens appended; after each call
    the logits equal the plain full forward's at each row's last real position, and the
    cache's lengths moved by the real tokens only."""
    torch.manual_seed(0)
    m = LM(ModelConfig(n_layer=2, d_model=64, n_head=4, vocab_size=300, seq_len=32, **extra)).eval()
    x = torch.randint(0, 300, (3, 30))
    full, _ = m(x)
    lens = [5, 9, 2]
    padded = torch.zeros(3, 9, dtype=torch.long)
    for r, n in enumerate(lens):
        padded[r, :n] = x[r, :n]
    cache = m.new_cache(4)
    rows = torch.tensor([2, 0, 3])  # any slots, not 0..B-1
    cache.reset(rows)
    with torch.no_grad():
        got = m.decode(padded, cache, rows, torch.tensor(lens))
        want = torch.stack([full[r, n - 1] for r, n in enumerate(lens)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert cache.lengths[rows].tolist() == lens
        pos = list(lens)
        chunk = torch.stack([x[r, p:p + 4] for r, p in enumerate(pos)])  # 4 tokens on every row
        got = m.decode(chunk, cache, rows)
        pos = [p + 4 for p in pos]
        torch.testing.assert_close(got, torch.stack([full[r, p - 1] for r, p in enumerate(pos)]), atol=1e-5, rtol=1e-4)
        while max(pos) < 30:
            tok = torch.stack([x[r, p] for r, p in enumerate(pos)])[:, None]
            got = m.decode(tok, cache, rows)
            pos = [p + 1 for p in pos]
            torch.testing.assert_close(got, torch.stack([full[r, p - 1] for r, p in enumerate(pos)]),
                                       atol=1e-5, rtol=1e-4)
        assert cache.lengths[rows].tolist() == pos and cache.lengths[1] == 0


def test_cache_advances_and_resets_its_own_lengths():
    m = LM(ModelConfig(n_layer=1, d_model=32, n_head=2, vocab_size=50, seq_len=16))
    cache = m.new_cache(4)
    cache.advance(None, 3)
    cache.advance(None, torch.tensor([1, 2]))
    cache.advance(torch.tensor([3]), torch.tensor([5]))
    assert cache.lengths.tolist() == [4, 5, 3, 8]
    cache.reset(torch.tensor([1, 3]))
    assert cache.lengths.tolist() == [4, 0, 3, 0]


def test_greedy_generation_equals_argmax_of_full_forward():
    torch.manual_seed(0)
    m = LM(ModelConfig(n_layer=2, d_model=64, n_head=4, vocab_size=300, seq_len=48)).eval()
    prompt = [5, 17, 42]
    got = list(generate(m, prompt, 10, temperature=0))
    ids = list(prompt)
    for _ in range(10):
        logits, _ = m(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    assert got == ids[3:]


def test_top_k_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).sum() == 3
    kept = ~torch.isinf(filter_logits(logits, top_p=0.9))
    assert kept[0, 0] and kept.sum() < 5


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_head_loss_matches_plain_cross_entropy(masked):
    torch.manual_seed(0)
    m = LM(ModelConfig(n_layer=2, d_model=64, n_head=4, vocab_size=300, seq_len=32, tie_embeddings=True))
    x, y = torch.randint(0, 300, (3, 20)), torch.randint(0, 300, (3, 20))
    mask = (torch.rand(3, 20) > 0.5) if masked else None
    _, fused = m(x, y, loss_mask=mask)  # grad enabled: the chunked path
    fused.backward()
    g_fused = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    logits = m.lm_head(m.norm(_hidden(m, x))).float()
    nll = torch.nn.functional.cross_entropy(logits.view(-1, 300), y.view(-1), reduction="none")
    ref = nll.mean() if mask is None else (nll * mask.view(-1)).sum() / mask.sum()
    ref.backward()
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(g_fused[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    with torch.no_grad():  # eval takes the plain path and agrees
        torch.testing.assert_close(m(x, y, loss_mask=mask)[1], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("whole", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_over_many_chunks_both_weight_gradient_paths(whole, dtype, monkeypatch):
    """Several chunks (and a ragged last one); the head's weight gradient either as one matmul
    over the kept chunk gradients or as a running fp32 sum (above _WHOLE_GRAD_ELEMENTS)."""
    import exaflop.nn.loss as loss_mod

    monkeypatch.setattr(loss_mod, "_WHOLE_GRAD_ELEMENTS", 1 << 25 if whole else 0)
    torch.manual_seed(0)
    h = (torch.randn(70, 32) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(300, 32) * 0.2).requires_grad_()
    y = torch.randint(0, 300, (70,))
    mask = torch.rand(70) > 0.3
    got = loss_mod.linear_cross_entropy(h, w, y, mask, chunk=16)
    got.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    nll = torch.nn.functional.cross_entropy((h @ w.to(dtype).t()).float(), y, reduction="none")
    ref = (nll * mask).sum() / mask.sum()
    ref.backward()
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-2}
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(gh, h.grad, **tol)
    torch.testing.assert_close(gw, w.grad, **tol)
    assert gw.dtype == torch.float32  # the master weight's own dtype, no round trip


@pytest.mark.skipif(not __import__("exaflop.nn.loss", fromlist=["xent_kernel"]).xent_kernel(),
                    reason="exaflop's CPU kernels could not be built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_kernel_matches_the_pytorch_path_and_ignores_the_thread_count(dtype, monkeypatch):
    """The loss kernel (csrc/cross_entropy.cpp) gives the PyTorch path's loss and gradients within
    rounding, the same bits at 1 and 2 threads, and refuses a target outside the vocabulary."""
    from exaflop.nn.loss import linear_cross_entropy

    torch.manual_seed(1)
    h = (torch.randn(300, 48) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(1000, 48) * 0.2).requires_grad_()
    y = torch.randint(0, 1000, (300,))
    mask = torch.rand(300) > 0.2

    def run(kernel: bool) -> list[torch.Tensor]:
        monkeypatch.setenv("EXAFLOP_XENT_KERNEL", "1" if kernel else "0")
        h.grad = w.grad = None
        loss = linear_cross_entropy(h, w, y, mask, chunk=128)
        loss.backward()
        return [loss.detach(), h.grad.clone(), w.grad.clone()]

    fast, ref = run(True), run(False)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-2}
    for a, c in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, c, **tol)
    # The kernel's own output (not the matmuls around it, whose blocking follows the thread count).
    logits = (h @ w.to(dtype).t()).detach()
    rw = mask.float() / mask.sum()
    outs = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            outs.append(torch.ops.exaflop.xent_rows(logits, y, rw))
        finally:
            torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    monkeypatch.setenv("EXAFLOP_XENT_KERNEL", "1")
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        linear_cross_entropy(h, w, torch.full((300,), 1000), chunk=128)


@pytest.mark.compile
def test_chunked_loss_compiled_matches_eager():
    """Compiled, the loss takes its functional form (nn/loss.py): same loss and gradients."""
    from exaflop.engine.precision import compile_cache_per_isa
    from exaflop.nn.loss import linear_cross_entropy

    # As the trainer does: inductor's cache is not keyed by the ISA torch is held to, and a graph
    # cached by a native run gave garbage to an AVX2-capped one (engine/precision.py).
    compile_cache_per_isa()

    torch.manual_seed(0)
    h = torch.randn(70, 32, requires_grad=True)
    w = (torch.randn(300, 32) * 0.2).requires_grad_()
    y = torch.randint(0, 300, (70,))
    got = torch.compile(lambda a, b: linear_cross_entropy(a, b, y, chunk=16))(h, w)
    got.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = linear_cross_entropy(h, w, y, chunk=16)
    ref.backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-5)


def _hidden(m, x):
    h = m.tok_emb(x)
    rope = (m.rope_cos[:x.shape[1]], m.rope_sin[:x.shape[1]])
    for block in m.blocks:
        h = block(h, rope)
    return h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 3])
def test_fused_decode_attention_matches_the_matmul_form(dtype, groups):
    """The compiler's form of decode attention (broadcast multiply + sum) equals the eager
    one (two matmuls), masks and grouped-query heads included. Run eagerly here."""
    from exaflop.nn.decode import _decode_attention, _decode_attention_fused

    torch.manual_seed(0)
    B, K, L, D = 4, 2, 24, 16
    q = torch.randn(B, K * groups, 1, D, dtype=dtype)
    k, v = torch.randn(B, K, L, D, dtype=dtype), torch.randn(B, K, L, D, dtype=dtype)
    mask = (torch.arange(L)[None, :] < torch.tensor([1, 5, 17, 24])[:, None])[:, None, None, :]
    want = _decode_attention(q, k, v, mask)
    got = _decode_attention_fused(q.reshape(B, K, groups, D), k, v, mask).reshape(B, K * groups, 1, D)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got, want, **tol)
    # A row sees only its unmasked keys: changing a masked value changes nothing.
    v2 = v.clone()
    v2[0, :, 1:] = 1e3
    torch.testing.assert_close(_decode_attention_fused(q.reshape(B, K, groups, D), k, v2, mask)[0], got.reshape(B, K, groups, D)[0])


def test_embedding_gradient_through_the_opaque_kernel_equals_autograds():
    """nn/layers.py `embedding`: a compiled CPU step takes the table's gradient from an opaque op
    (exaflop's kernel, or PyTorch's); the same rows summed as F.embedding's own backward (repeats
    included)."""
    from exaflop.nn.cpu_ops import _EmbeddingCPU

    torch.manual_seed(0)
    w = torch.randn(50, 16, requires_grad=True)
    idx = torch.randint(0, 50, (4, 30))  # 120 ids into 50 rows: many repeats
    g = torch.randn(4, 30, 16)
    F.embedding(idx, w).backward(g)
    ref, w.grad = w.grad, None
    out = _EmbeddingCPU.apply(idx, w)
    assert torch.equal(out, F.embedding(idx, w))
    out.backward(g)
    torch.testing.assert_close(w.grad, ref, rtol=0, atol=1e-6)


def test_embedding_gradient_kernel_sums_in_token_order_whatever_the_threads():
    """csrc/embedding.cpp: each thread owns a range of table rows; the sums come out the same with
    one thread or two (fp32 resume stays bit-exact), repeats included, and a bad index is an error."""
    from exaflop.nn.kernels import cpu_kernels

    if not cpu_kernels():
        pytest.skip("exaflop's CPU kernels are not built here")
    torch.manual_seed(0)
    g, idx = torch.randn(600, 48), torch.randint(0, 97, (600,))
    exact = torch.zeros(97, 48, dtype=torch.float64).index_add_(0, idx, g.double())
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(torch.ops.exaflop.embedding_grad_rows(g, idx, 97))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0].double(), exact, rtol=0, atol=1e-5)
    assert (outs[0][torch.bincount(idx, minlength=97) == 0] == 0).all()
    with pytest.raises(RuntimeError, match="outside the table"):
        torch.ops.exaflop.embedding_grad_rows(g, torch.full((600,), 97), 97)


@pytest.mark.compile
def test_compiled_training_gradients_match_eager():
    torch.manual_seed(0)
    m = LM(ModelConfig(n_layer=2, d_model=64, n_head=4, vocab_size=256, seq_len=32))
    x, y = torch.randint(0, 256, (2, 2, 32))
    grads = []
    for fn in (m, torch.compile(m)):
        m.zero_grad(set_to_none=True)
        fn(x, y)[1].backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-5, msg=n)
