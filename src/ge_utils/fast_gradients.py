"""Fast exact gradient inner products from activations and output gradients ("ghost" products).

For a linear layer ``y_r = W a_r`` and a scalar ``f_i`` that depends on rows ``r`` of sequence i,
``grad_W f_i = sum_r g_r a_r^T`` with ``g_r = d f_i / d y_r``. Hence

    <grad_W f_i, grad_W f_j> = sum_{r in i, s in j} (a_r . a_s) (g_r . g_s)

which needs only the layer's inputs and output gradients, never a per-sequence gradient of the
weight. One forward and one backward of ``sum_i f_i`` over a batch give every sequence's rows,
because sequences do not interact. The same identity covers embeddings (``a_r`` one-hot: a
token-equality mask; the ``padding_idx`` row gets no gradient), tied input/output embeddings and
modules called more than once (the cross terms between the uses of a weight are included),
GPT-2's ``Conv1D`` and LoRA's adapter layers. Biases, LayerNorm and RMSNorm weights get their
per-sequence gradients materialized in closed form (an RMSNorm class's formula is checked once
with a forward-mode derivative); any other module with few parameters gets them by per-sequence
autograd through that module alone. A parameter of any other kind raises an error naming it, and
so does a parameter used outside its own module (e.g. ``F.linear(h, emb.weight)``).

Per linear layer, whichever is cheaper is used: the Gram products above (cost ``T^2 (P + Q)`` per
pair) or materialized per-sequence gradients (``T P Q`` per sequence), both exact. Products are
computed in the model's precision (at least float32) and summed per pair in float64. Forward
hooks of the user's that change a module's output, and gradient checkpointing (reentrant or
not), are handled. Modules other than linear layers and embeddings that own parameters of the
set must be called with one positional tensor.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ge_utils.gradients import ParamSpec, parameter_set
from ge_utils.logprobs import (
    SequenceBatch,
    concat_batches,
    hidden_states,
    sequence_logprobs,
    target_positions,
    token_logprobs,
    unwrap_model,
)

MATERIALIZE_BYTES = 256 * 2**20  # largest per-layer block of materialized per-sequence gradients
SMALL_MODULE_NUMEL = 2**20  # most parameters (in the set) of a module handled by per-seq autograd
TINY_COEFFICIENT = 1e-12  # |dLoss/du_i| below this: sequence i's unit statistics are NaN
PAIR_KEYS = ("norm2_chosen", "norm2_rejected", "inner")
Node = torch.autograd.graph.Node


@dataclass
class _Use:
    """One use of a parameter in a forward pass, as per-sequence row factors (N, T, .).

    ``grad_i = sum_t left[i, t] (x) right[i, t]``; ``left`` is dense or given by ``ids`` (one-hot
    rows). ``vec`` holds materialized per-sequence gradients (N, numel) instead.
    """

    left: Tensor | None = None
    ids: Tensor | None = None
    right: Tensor | None = None
    vec: Tensor | None = None


def _gram(x: Tensor, y: Tensor) -> Tensor:
    """(B, T, D) x (B, S, D) -> (B, T, S) row products."""
    return torch.bmm(x, y.transpose(1, 2))


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64  # MPS has no float64


Index = slice | Tensor  # rows of the per-sequence factors: a range, or (K,) long indices


def _as_index(idx: Tensor) -> Index:
    """A contiguous ascending range as a slice (a view, no copy), anything else as is."""
    if len(idx) > 0 and torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + len(idx))):
        return slice(int(idx[0]), int(idx[0]) + len(idx))
    return idx


def _take(t: Tensor, idx: Index) -> Tensor:
    return t[idx] if isinstance(idx, slice) else t.index_select(0, idx.to(t.device))


def _left_gram(u: _Use, v: _Use, ii: Index, jj: Index) -> Tensor:
    if u.ids is not None and v.ids is not None:
        return (_take(u.ids, ii)[:, :, None] == _take(v.ids, jj)[:, None, :]).to(u.right.dtype)
    if u.ids is None and v.ids is None:
        return _gram(_take(u.left, ii), _take(v.left, jj))
    if u.ids is not None:  # one-hot x dense: read the dense rows at the token ids
        return _left_gram(v, u, jj, ii).transpose(1, 2)
    idx = _take(v.ids, jj)[:, None, :].expand(-1, u.left.shape[1], -1)
    return torch.gather(_take(u.left, ii), 2, idx)


def _use_inner(u: _Use, v: _Use, ii: Index, jj: Index) -> Tensor:
    """(B,) inner products <grad of use u on sequence ii[k], grad of use v on sequence jj[k]>."""
    if u.vec is not None or v.vec is not None:
        if u.vec is None or v.vec is None:
            raise TypeError("cannot mix materialized and factored uses of one parameter")
        prod = _take(u.vec, ii) * _take(v.vec, jj)
        return prod.sum(1, dtype=_acc_dtype(prod))
    prod = _left_gram(u, v, ii, jj) * _gram(_take(u.right, ii), _take(v.right, jj))
    return prod.sum((1, 2), dtype=_acc_dtype(prod))


def _materialize(u: _Use) -> _Use:
    """Replace factors by per-sequence gradients when that is cheaper and fits in memory.

    For N = 2B sequences of T rows and 3 products per pair, materializing costs about
    ``2 N T P Q`` flops and the Gram products ``6 B T^2 (P + Q)``: materialize when
    ``2 P Q < 3 T (P + Q)``.
    """
    if u.ids is not None or u.vec is not None:
        return u
    n, t, p = u.left.shape
    q = u.right.shape[2]
    if n * p * q * u.left.element_size() <= MATERIALIZE_BYTES and 2 * p * q < 3 * t * (p + q):
        return _Use(vec=torch.einsum("ntp,ntq->npq", u.left, u.right).reshape(n, p * q))
    return u


def _kind(module: nn.Module) -> str:
    """``linear`` (nn.Linear, transformers' Conv1D), ``embedding``, ``norm`` (LayerNorm,
    RMSNorm) or ``small`` (anything else; allowed when its parameters are few)."""
    forward = type(module).forward
    if isinstance(module, nn.Linear) and forward is nn.Linear.forward:
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "linear"
    if isinstance(module, nn.Embedding) and forward is nn.Embedding.forward:
        return "embedding" if not module.scale_grad_by_freq else "small"
    if forward is nn.LayerNorm.forward or forward is nn.RMSNorm.forward:
        return "norm"
    names = [n for n, _ in module.named_parameters(recurse=False)]
    return "norm" if type(module).__name__.endswith("RMSNorm") and names == ["weight"] else "small"


class _Bare(nn.Module):
    """Runs ``inner.forward`` directly: the module's own computation without its hooks (whose
    output changes, if any, lie downstream of the output gradient that the recorder sees)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner.forward(x)


_SLOPE_IS_NORMALIZED: dict[type, bool] = {}  # per RMSNorm class: checked once per process


def _normalized(module: nn.Module, x: Tensor) -> Tensor | None:
    """``x`` normalized as a ``norm`` module does before its elementwise affine map, so that the
    weight's gradient is ``sum_rows g * x_hat`` (and a bias's ``sum_rows g``). None when a
    class named ``*RMSNorm`` turns out not to be ``s(w) * x_hat`` with ``ds/dw = 1`` (checked
    once per class with a forward-mode derivative); then per-sequence autograd is used."""
    forward = type(module).forward
    if forward is nn.LayerNorm.forward:
        return nn.functional.layer_norm(x, module.normalized_shape, eps=module.eps)
    if forward is nn.RMSNorm.forward:
        return nn.functional.rms_norm(x, module.normalized_shape, eps=module.eps)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    x32 = x.float()
    x_hat = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    known = _SLOPE_IS_NORMALIZED.get(type(module))
    if known is None:
        weight = module.weight.detach()
        direction = torch.linspace(0.5, 1.5, weight.numel(), dtype=weight.dtype)
        direction = direction.to(weight.device).reshape(weight.shape)

        def forward_of(w: Tensor) -> Tensor:
            return torch.func.functional_call(_Bare(module), {"inner.weight": w}, (x,))

        try:
            _, slope = torch.func.jvp(forward_of, (weight,), (direction,))
        except RuntimeError:  # forward-mode AD cannot run it: treat as unknown
            known = False
        else:
            expected = (direction * x_hat).float()
            tol = 1e-3 * float(expected.abs().max())
            known = bool(torch.allclose(slope.float(), expected, rtol=1e-3, atol=tol))
        _SLOPE_IS_NORMALIZED[type(module)] = known
    return x_hat if known else None


class GhostRecorder:
    """Records per-sequence factors of every use of the parameter set during one forward and
    backward, then returns inner products of per-sequence gradients.

    Usage: construct (hooks are registered), set :attr:`row_seq` / :attr:`n_seq` (or pass
    ``batch``), run the forward, name the wanted products with :meth:`expect` or
    :meth:`expect_pairs` (implied by ``batch`` with an even number of rows: chosen rows first),
    back-propagate, read :meth:`results`. Each layer's contribution is reduced inside its
    backward hook, so memory stays bounded by one layer's factors.

    The backward may be of any ``sum_i c_i f_i`` (e.g. a training loss, ``c_i = dLoss/du_i``):
    since every statistic is bilinear in the output gradients, dividing by ``c_i c_j`` recovers
    those of the unit gradients ``grad f_i``; set :attr:`scale` ``= c`` (N,) or call
    :meth:`pair_stats`. A sequence with ``|c_i| < TINY_COEFFICIENT`` carries no usable gradient
    in that backward: its statistics are NaN. With ``keep_outputs=False`` the caller runs its own
    backward (e.g. ``loss.backward()``: parameter gradients accumulate as usual) instead of
    :meth:`backward`; call :meth:`check_uses` on the loss before it to catch parameters used
    outside their modules.
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSpec = None,
        keep_outputs: bool = True,
        batch: SequenceBatch | None = None,
    ):
        self.named = parameter_set(model, params)
        frozen = [n for n, p in self.named if not p.requires_grad]
        if frozen:
            raise ValueError(f"parameter(s) in the set do not require grad: {', '.join(frozen)}")
        self.names = {id(p): n for n, p in self.named}
        self.uses: dict[int, list[_Use]] = defaultdict(list)  # kept for pairwise cross terms
        self.targets: dict[str, tuple[Tensor, Tensor]] = {}
        self._index: dict[str, tuple[Index, Index]] = {}
        self.totals: dict[str, Tensor] = {}
        self._gram_cache: dict[tuple[str | None, str], tuple[Tensor, Tensor]] = {}
        self._fused: list[str] = []
        self.gram_reuses = 0  # Gram matrices shared by layers with one input (q, k, v; gate, up)
        self.outputs: list[Tensor] = []  # for backward(); off when the caller back-propagates
        self.keep_outputs = keep_outputs
        self.handles: list = []
        self.row_seq: Tensor | None = None
        self.n_seq: int | None = None
        self.scale: Tensor | None = None
        self.calls: dict[int, int] = defaultdict(int)  # module id -> calls under grad
        self.param_calls: dict[int, int] = defaultdict(int)  # param id -> owning-module calls
        self.factored: set[int] = set()  # params of linear and embedding modules
        self._recorded = False
        self._busy = False  # re-running a small module for its per-sequence gradients
        owners: dict[int, int] = defaultdict(int)
        too_big = []
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in self.names]
            if not own:
                continue
            kind = _kind(module)
            if kind == "small" and sum(p.numel() for p in own) > SMALL_MODULE_NUMEL:
                too_big += [self.names[id(p)] for p in own]
                continue
            if kind in ("linear", "embedding"):
                self.factored |= {id(p) for p in own}
            self.handles.append(
                module.register_forward_hook(  # first: it sees the module's own output
                    self._hook_for(module, kind, own), with_kwargs=True, prepend=True
                )
            )
            for p in own:
                owners[id(p)] += 1
        if too_big:
            self.close()
            raise TypeError(
                f"fast statistics cannot handle parameter(s): {', '.join(too_big)} (owned by "
                f"modules that are neither linear layers nor embeddings and hold over "
                f"{SMALL_MODULE_NUMEL} parameters)"
            )
        self.shared = {pid for pid, n in owners.items() if n > 1}  # e.g. tied embeddings
        if batch is not None:
            self.n_seq = len(batch)
            self.row_seq = target_positions(batch)[0]
            if len(batch) % 2 == 0:
                self.expect_pairs(len(batch) // 2)

    def _hook_for(self, module: nn.Module, kind: str, own: list[nn.Parameter]) -> Callable:
        own_ids = {id(p) for p in own}

        def forward_hook(mod: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            if self._busy or not torch.is_grad_enabled():
                return
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"fast statistics need a tensor output from {type(mod).__name__}, which owns "
                    + ", ".join(self.names[i] for i in own_ids)
                )
            if not output.requires_grad:
                return
            x = args[0] if args else kwargs.get("input")
            one_input = len(args) == 1 and not kwargs
            if not isinstance(x, Tensor) or (kind in ("norm", "small") and not one_input):
                raise TypeError(
                    f"fast statistics need {type(mod).__name__} (owner of "
                    + ", ".join(self.names[i] for i in own_ids)
                    + ") to be called with one positional tensor"
                    + (" and no keyword arguments" if kind in ("norm", "small") else "")
                )
            self.calls[id(mod)] += 1
            for pid in own_ids:
                self.param_calls[pid] += 1
            saved = [x.detach()]  # released once used, like autograd's saved tensors

            def grad_hook(grad: Tensor) -> None:
                if saved:  # a second backward through a retained graph records nothing
                    self._record(mod, kind, own, saved.pop(), grad.detach())

            output.register_hook(grad_hook)
            if self.keep_outputs:
                self.outputs.append(output)

        return forward_hook

    def _rows(self, t: Tensor, promote: bool = True) -> Tensor:
        """(N, T, D) per-sequence rows of a layer input or output gradient; half precisions are
        promoted to float32 unless ``promote`` is False. 2-D rows (the output head applied to
        selected positions) are grouped by :attr:`row_seq` and zero-padded."""
        if promote:
            t = t.to(torch.promote_types(t.dtype, torch.float32))
        if t.dim() == 3:
            return t
        if self.row_seq is None or self.n_seq is None:
            raise RuntimeError("a layer saw 2-D inputs but row_seq was not set")
        seq = self.row_seq.to(t.device)
        counts = torch.bincount(seq, minlength=self.n_seq)
        slot = torch.arange(len(seq), device=t.device) - (counts.cumsum(0) - counts)[seq]
        out = t.new_zeros((self.n_seq, int(counts.max()), *t.shape[1:]))
        out[seq, slot] = t
        return out

    def _record(
        self, mod: nn.Module, kind: str, own: list[nn.Parameter], x: Tensor, grad: Tensor
    ) -> None:
        self._recorded = True
        repeated = self.calls[id(mod)] > 1
        if kind == "small":
            for p, vec in zip(own, self._small_grads(mod, own, x, grad), strict=True):
                self._add(id(p), _Use(vec=vec), keep=repeated)
            return
        weight, bias = mod.weight, getattr(mod, "bias", None)
        if kind == "norm":
            self._busy = True  # the first call of an RMSNorm class runs its forward once more
            try:
                x_hat = _normalized(mod, x)
            finally:
                self._busy = False
            if x_hat is None:
                self._record(mod, "small", own, x, grad)
                return
            g = self._rows(grad)
            if weight is not None and any(p is weight for p in own):
                self._add(id(weight), _Use(vec=(g * self._rows(x_hat)).sum(1)), keep=repeated)
            if bias is not None and any(p is bias for p in own):
                self._add(id(bias), _Use(vec=g.sum(1)), keep=repeated)
            return
        g = self._rows(grad)
        if kind == "embedding":
            ids = self._rows(x[..., None], promote=False)[..., 0].long()
            if mod.padding_idx is not None:  # that row's gradient is zero by definition
                g = g * (ids != mod.padding_idx)[..., None].to(g.dtype)
            self._add(id(weight), _Use(ids=ids, right=g), keep=repeated)
            return
        if any(p is weight for p in own):
            a = self._rows(x)
            left, right = (a, g) if type(mod).__name__ == "Conv1D" else (g, a)
            keep = repeated or id(weight) in self.shared
            use = _Use(left=left, right=right)
            self._add(id(weight), use if keep else _materialize(use), keep=repeated)
        if bias is not None and any(p is bias for p in own):
            self._add(id(bias), _Use(vec=g.sum(1)), keep=repeated)

    def _small_grads(
        self, mod: nn.Module, own: list[nn.Parameter], x: Tensor, grad: Tensor
    ) -> list[Tensor]:
        """Per-sequence gradients (N, numel) of ``own`` parameters of ``mod``, from its input
        ``x`` and output gradient: per-sequence vector-Jacobian products through ``mod`` alone
        (vectorized with vmap; a plain loop over sequences where vmap cannot run the module).
        Exact for any module that treats sequences independently."""
        x, grad = self._rows(x, promote=False), self._rows(grad, promote=False)
        names: dict[str, Tensor] = dict(mod.named_parameters(recurse=False))
        wanted = [n for n, p in names.items() if any(p is q for q in own)]
        self._busy = True
        try:
            with torch.enable_grad():
                try:
                    per_seq = self._small_grads_vmap(mod, names, wanted, x, grad)
                except RuntimeError:
                    per_seq = self._small_grads_loop(mod, [names[n] for n in wanted], x, grad)
        finally:
            self._busy = False
        return [
            t.reshape(len(x), -1).to(torch.promote_types(t.dtype, torch.float32)) for t in per_seq
        ]

    @staticmethod
    def _small_grads_vmap(
        mod: nn.Module, names: dict[str, Tensor], wanted: list[str], x: Tensor, grad: Tensor
    ) -> list[Tensor]:
        """Vectorized over sequences, in at least float32 (parameters and rows promoted)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        bare = _Bare(mod)
        fixed = {f"inner.{n}": p.detach().to(dtype) for n, p in names.items() if n not in wanted}

        def contribution(free: dict[str, Tensor], xi: Tensor, gi: Tensor) -> Tensor:
            out = torch.func.functional_call(bare, {**fixed, **free}, (xi[None],))
            return (out * gi[None].to(out.dtype)).sum()

        free = {f"inner.{n}": names[n].detach().to(dtype) for n in wanted}
        per_seq = torch.func.vmap(torch.func.grad(contribution), in_dims=(None, 0, 0))
        grads = per_seq(free, x.to(dtype), grad.to(dtype))
        return [grads[f"inner.{n}"] for n in wanted]

    @staticmethod
    def _small_grads_loop(
        mod: nn.Module, params: list[nn.Parameter], x: Tensor, grad: Tensor
    ) -> list[Tensor]:
        """One vector-Jacobian product per sequence, in the module's own precision."""
        rows = []
        for i in range(len(x)):
            out = mod.forward(x[i : i + 1])  # without hooks, like _Bare
            rows.append(torch.autograd.grad(out, params, grad[i : i + 1].to(out.dtype)))
        return [torch.stack(col) for col in zip(*rows, strict=True)]

    def expect(self, **targets: tuple[Tensor, Tensor]) -> None:
        """Name the inner products to compute, before the backward: ``name=(ii, jj)`` asks for
        ``<grad f_ii[k], grad f_jj[k]>`` for every k."""
        if self._recorded:
            raise RuntimeError("expect(...) must be called before the backward")
        self.targets = {k: (ii.long(), jj.long()) for k, (ii, jj) in targets.items()}
        self._index = {k: (_as_index(ii), _as_index(jj)) for k, (ii, jj) in self.targets.items()}
        self.totals = {}
        # Several self-products (|grad f_i|^2, e.g. chosen and rejected norms) share one Gram
        # over all sequences, read at their rows: fewer, larger products.
        fused = [k for k, (ii, jj) in self.targets.items() if torch.equal(ii, jj)]
        self._fused = fused if len(fused) > 1 else []

    def expect_pairs(self, n_pairs: int) -> None:
        """Ask for ``norm2_chosen``, ``norm2_rejected`` and ``inner`` of sequences laid out as
        ``[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]``."""
        w = torch.arange(n_pairs)
        self.expect(
            norm2_chosen=(w, w), norm2_rejected=(w + n_pairs, w + n_pairs), inner=(w, w + n_pairs)
        )

    def _add(self, pid: int, use: _Use, keep: bool = False) -> None:
        """Reduce ``use`` into the totals now, or keep it when the parameter has other uses in
        this forward (tied weights, repeated calls) whose cross terms are needed."""
        if not self.targets:
            raise RuntimeError("GhostRecorder.expect(...) must be called before the backward")
        if keep or pid in self.shared:
            self.uses[pid].append(use)
            return
        if use.vec is not None or use.ids is not None:
            for key, (ii, jj) in self._index.items():
                self._accumulate(key, _use_inner(use, use, ii, jj))
            return
        if self._fused:
            per_seq = self._factored_inner(use, None)  # (N,) every |grad f_i|^2 of this layer
            for key in self._fused:
                self._accumulate(key, _take(per_seq, self._index[key][0]))
        for key in self._index.keys() - set(self._fused):
            self._accumulate(key, self._factored_inner(use, key))

    def _factored_inner(self, use: _Use, key: str | None) -> Tensor:
        """(K,) inner products of a factored use for the rows of ``key`` (None: every sequence
        with itself). Layers that share an input (q, k, v; gate, up) reuse its Gram matrix."""
        prod = self._gram_of(use.left, key, "left") * self._gram_of(use.right, key, "right")
        return prod.sum((1, 2), dtype=_acc_dtype(prod))

    def _accumulate(self, key: str, value: Tensor) -> None:
        if key in self.totals:
            self.totals[key] += value.to(self.totals[key])
        else:
            self.totals[key] = value.clone()

    def _gram_of(self, t: Tensor, key: str | None, side: str) -> Tensor:
        """``_gram(t[ii], t[jj])`` for the rows of ``key`` (None: all with themselves), reused
        when the previous call for ``(key, side)`` saw the same rows (same storage and shape).
        The cache holds that tensor, so its storage cannot be freed and handed to a different
        tensor while the entry lives."""
        held = self._gram_cache.get((key, side))
        if held is not None and held[0].data_ptr() == t.data_ptr() and held[0].shape == t.shape:
            self.gram_reuses += 1
            return held[1]
        ii, jj = self._index[key] if key is not None else (slice(None), slice(None))
        gram = _gram(_take(t, ii), _take(t, jj))
        self._gram_cache[(key, side)] = (t, gram)
        return gram

    def results(self) -> dict[str, Tensor]:
        """The requested inner products (float64 (B,) each, on the CPU), summed over the
        parameter set, divided by ``scale[ii] * scale[jj]`` when :attr:`scale` is set."""
        self._gram_cache.clear()
        out = {k: torch.zeros(len(ii), dtype=torch.float64) for k, (ii, _) in self.targets.items()}
        for key, total in self.totals.items():
            out[key] += total.double().cpu()
        for uses in self.uses.values():  # every pair of uses of one parameter
            for u in uses:
                for v in uses:
                    for key, (ii, jj) in self._index.items():
                        out[key] += _use_inner(u, v, ii, jj).double().cpu()
        if self.scale is not None:
            c = self.scale.detach().double().cpu()
            c = torch.where(c.abs() < TINY_COEFFICIENT, torch.nan, c)
            out = {k: v / (c[self.targets[k][0]] * c[self.targets[k][1]]) for k, v in out.items()}
        return out

    def pair_stats(self, coef_chosen: Tensor, coef_rejected: Tensor) -> dict[str, Tensor]:
        """``norm2_chosen``, ``norm2_rejected``, ``inner`` (float64 (B,)) of the unit gradients
        ``grad u``, after a backward of ``sum_i coef_chosen[i] u_w[i] + coef_rejected[i] u_l[i]``
        (e.g. ``coef = dLoss/du``: ``-d_w / n`` and ``+d_l / n`` for a margin loss averaged
        over n pairs). NaN for a pair with a coefficient below ``TINY_COEFFICIENT`` in size."""
        if set(self.targets) != set(PAIR_KEYS):
            raise RuntimeError("pair_stats needs expect_pairs(...) (or batch=) before the backward")
        self.scale = torch.cat([coef_chosen.detach().flatten(), coef_rejected.detach().flatten()])
        return self.results()

    def check_uses(self, value: Tensor) -> None:
        """Raise if a parameter of the set is used in the graph of ``value`` outside its own
        module (e.g. ``F.linear`` on an embedding weight, a ``ParameterDict`` read directly),
        whose gradient the hooks would miss: a linear or embedding weight that enters the graph
        more often than its modules ran, any other parameter whose module never ran. Call after
        the forward, before the backward."""
        edges: dict[int, int] = defaultdict(int)
        for node in _graph_nodes(value.grad_fn):
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) in self.names:
                edges[id(variable)] += 1
        calls = self.param_calls
        extra = [
            self.names[p]
            for p, n in edges.items()
            if (n > calls[p] if p in self.factored else calls[p] == 0)
        ]
        if extra:
            raise RuntimeError(
                "parameter(s) used outside their own module (fast statistics cannot record "
                f"them): {', '.join(extra)}"
            )

    def backward(self, value: Tensor, retain_graph: bool = False) -> None:
        """Back-propagate ``value`` to the recorded layer outputs only: the hooks see every
        output gradient, and no parameter gradient is computed or stored. With
        ``retain_graph`` the forward's graph survives for a later ``loss.backward()`` (which
        then accumulates parameter gradients and records nothing)."""
        self.check_uses(value)
        outputs, self.outputs = self.outputs, []
        if outputs:  # else no parameter of the set took part: every statistic is 0
            torch.autograd.grad(value, outputs, allow_unused=True, retain_graph=retain_graph)

    def clear(self) -> None:
        """Forget everything recorded (hooks stay): ready for another forward and backward."""
        self.uses.clear()
        self.outputs.clear()
        self.calls.clear()
        self.param_calls.clear()
        self.targets, self._index, self.totals, self._gram_cache = {}, {}, {}, {}
        self._fused = []
        self.scale, self._recorded, self.gram_reuses = None, False, 0

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> GhostRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _graph_nodes(root: Node | None) -> Iterator[Node]:
    """Every edge target reachable from ``root`` (a node reached by k edges is yielded k
    times; each node's own edges are followed once)."""
    seen: set[Node] = set()
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            yield child
            if child not in seen:
                seen.add(child)
                stack.append(child)


def fast_gradient_stats(
    model: nn.Module, chosen: SequenceBatch, rejected: SequenceBatch, params: ParamSpec = None
) -> dict[str, Tensor]:
    """Same result as :func:`ge_utils.gradients.exact_gradient_stats`, from one forward and one
    backward over the 2B sequences: float64 (B,) ``logp_chosen``, ``logp_rejected``,
    ``norm2_chosen``, ``norm2_rejected``, ``inner``. Eval mode; parameter ``.grad`` fields are
    left untouched."""
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected sequences")
    joint = concat_batches(chosen, rejected)
    was_training = model.training
    model.eval()
    try:
        with GhostRecorder(model, params, batch=joint) as rec:
            u = sequence_logprobs(model, joint)
            rec.backward(u.sum())
            stats = rec.results()
    finally:
        model.train(was_training)
    b = len(chosen)
    return {
        "logp_chosen": u[:b].detach().double().cpu(),
        "logp_rejected": u[b:].detach().double().cpu(),
        **stats,
    }


def training_step_stats(
    model: nn.Module,
    chosen: SequenceBatch,
    rejected: SequenceBatch,
    loss_of_logps: Callable[[Tensor, Tensor], Tensor],
    params: ParamSpec = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One training forward and ``loss.backward()`` (parameter ``.grad`` accumulate as usual)
    that also yields every pair's gradient statistics, from that same backward.

    ``loss_of_logps(u_w, u_l)`` maps the (B,) summed response log-probs to a scalar loss that
    depends on the parameters only through them (a reference model's log-probs are constants).
    Its coefficients ``c = dLoss/du`` come from autograd (for a margin loss averaged over n pairs
    ``-d_w / n`` and ``+d_l / n``); the backward carries output gradients scaled by ``c``, which
    the recorder divides out. Returns the detached loss and a dict with float64 (B,)
    ``logp_chosen``, ``logp_rejected``, ``norm2_chosen``, ``norm2_rejected``, ``inner``,
    ``coef_chosen``, ``coef_rejected``; a pair with a coefficient below ``TINY_COEFFICIENT`` in
    size (e.g. a hinge loss already satisfied) gets NaN statistics. The model's mode is left as
    it is (dropout, if on, is part of the realized gradients).
    """
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected sequences")
    joint = concat_batches(chosen, rejected)
    b = len(chosen)
    with GhostRecorder(model, params, keep_outputs=False, batch=joint) as rec:
        u = sequence_logprobs(model, joint)
        loss = loss_of_logps(u[:b], u[b:])
        if loss.dim() != 0:
            raise ValueError(f"loss_of_logps must return a scalar, got shape {tuple(loss.shape)}")
        (coef,) = torch.autograd.grad(loss, u, retain_graph=True)
        rec.check_uses(loss)
        loss.backward()
        stats = rec.pair_stats(coef[:b], coef[b:])
    return loss.detach(), {
        "logp_chosen": u[:b].detach().double().cpu(),
        "logp_rejected": u[b:].detach().double().cpu(),
        **stats,
        "coef_chosen": coef[:b].double().cpu(),
        "coef_rejected": coef[b:].double().cpu(),
    }


def _replicate(batch: SequenceBatch, n: int) -> SequenceBatch:
    return SequenceBatch(
        batch.input_ids.expand(n, -1).clone(),
        batch.attention_mask.expand(n, -1).clone(),
        batch.response_mask.expand(n, -1).clone(),
    )


def tokenwise_inner(
    model: nn.Module,
    chosen: SequenceBatch,
    rejected: SequenceBatch,
    scope: str = "all",
    params: ParamSpec = None,
) -> Tensor:
    """(T_w, T_l) float64 matrix of ``<grad log p(y_w,s), grad log p(y_l,t)>`` for ONE pair
    (one-row batches); T_w, T_l are the response lengths.

    ``scope='head'``: over the output layer's weight (and bias) only, in closed form from one
    forward without backward: the head gradient of token t's log-prob is ``(e_y - p_t) h_t^T``,
    so the matrix is ``(H_w H_l^T) * (G_w G_l^T)``. With tied embeddings this is the output use
    of the shared matrix only. ``params`` must be None.

    ``scope='all'``: over the parameter set, exact, from one forward and one backward over
    ``T_w + T_l`` copies of the two sequences, copy k back-propagating only its own token: the
    cost of a training step on a batch of ``T_w + T_l`` sequences plus ``T_w T_l`` Gram products
    per layer (``T^2 (P + Q)`` each, T the padded length); no gradient vector is stored. Brute
    force needs ``T_w + T_l`` backward passes and as many full gradient vectors.
    """
    if len(chosen) != 1 or len(rejected) != 1:
        raise ValueError("tokenwise_inner takes one chosen and one rejected sequence")
    if scope not in ("head", "all"):
        raise ValueError(f"scope must be 'head' or 'all', got {scope!r}")
    if scope == "head" and params is not None:
        raise ValueError("scope='head' is the output layer; params must be None")
    was_training = model.training
    model.eval()
    try:
        if scope == "head":
            return _tokenwise_head(model, chosen, rejected)
        t_w, t_l = int(chosen.response_lengths[0]), int(rejected.response_lengths[0])
        joint = concat_batches(_replicate(chosen, t_w), _replicate(rejected, t_l))
        with GhostRecorder(model, params, batch=joint) as rec:
            per_token = token_logprobs(model, joint)
            picked = torch.cat(
                [
                    per_token[:t_w][joint.response_mask[:t_w]].reshape(t_w, t_w).diagonal(),
                    per_token[t_w:][joint.response_mask[t_w:]].reshape(t_l, t_l).diagonal(),
                ]
            )
            ii = torch.arange(t_w).repeat_interleave(t_l)
            rec.expect(tokens=(ii, t_w + torch.arange(t_l).repeat(t_w)))
            rec.backward(picked.sum())
            return rec.results()["tokens"].reshape(t_w, t_l)
    finally:
        model.train(was_training)


@torch.no_grad()
def _tokenwise_head(model: nn.Module, chosen: SequenceBatch, rejected: SequenceBatch) -> Tensor:
    head = unwrap_model(model).get_output_embeddings()
    factors = []
    for batch in (chosen, rejected):
        rows, cols = target_positions(batch)
        h = hidden_states(model, batch)[rows, cols]
        probs = torch.softmax(head(h).double(), -1)
        g = -probs
        g[torch.arange(len(g), device=g.device), batch.input_ids[rows, cols + 1]] += 1.0
        factors.append((h.double(), g))
    (h_w, g_w), (h_l, g_l) = factors
    out = (h_w @ h_l.T) * (g_w @ g_l.T)
    if getattr(head, "bias", None) is not None:
        out = out + g_w @ g_l.T
    return out.cpu()
