"""Fast exact gradient inner products from activations and output gradients ("ghost" products).

For a linear layer ``y_r = W a_r`` and a scalar ``f_i`` that depends on rows ``r`` of sequence i,
``grad_W f_i = sum_r g_r a_r^T`` with ``g_r = d f_i / d y_r``. Hence

    <grad_W f_i, grad_W f_j> = sum_{r in i, s in j} (a_r . a_s) (g_r . g_s)

which needs only the layer's inputs and output gradients, never a per-sequence gradient of the
weight. One forward and one backward of ``sum_i f_i`` over a batch give every sequence's rows,
because sequences do not interact. The same identity covers embeddings (``a_r`` one-hot: a
token-equality mask), tied input/output embeddings (the cross terms between the two uses of the
weight are included), GPT-2's ``Conv1D`` and LoRA's adapter layers. Small parameters (biases,
norm weights) are handled by materializing their per-sequence gradients. A parameter of any
other kind raises an error naming it.

Per layer, whichever is cheaper is used: the Gram products above (cost ``T^2 (P + Q)`` per pair)
or materialized per-sequence gradients (``T P Q`` per sequence), both exact. Products are
computed in the model's precision (at least float32) and summed per pair in float64.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ge_utils.gradients import ParamSpec, parameter_set
from ge_utils.logprobs import (
    SequenceBatch,
    concat_batches,
    sequence_logprobs,
    target_positions,
    token_logprobs,
)

MATERIALIZE_BYTES = 256 * 2**20


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


def _left_gram(u: _Use, v: _Use, ii: Tensor, jj: Tensor) -> Tensor:
    if u.ids is not None and v.ids is not None:
        return (u.ids[ii][:, :, None] == v.ids[jj][:, None, :]).to(u.right.dtype)
    if u.ids is None and v.ids is None:
        return _gram(u.left[ii], v.left[jj])
    if u.ids is not None:  # one-hot x dense: read the dense rows at the token ids
        return _left_gram(v, u, jj, ii).transpose(1, 2)
    idx = v.ids[jj][:, None, :].expand(-1, u.left.shape[1], -1)
    return torch.gather(u.left[ii], 2, idx)


def _use_inner(u: _Use, v: _Use, ii: Tensor, jj: Tensor) -> Tensor:
    """(B,) inner products <grad of use u on sequence ii[k], grad of use v on sequence jj[k]>."""
    if u.vec is not None or v.vec is not None:
        if u.vec is None or v.vec is None:
            raise TypeError("cannot mix materialized and factored uses of one parameter")
        return (u.vec[ii] * v.vec[jj]).sum(1)
    return (_left_gram(u, v, ii, jj) * _gram(u.right[ii], v.right[jj])).sum((1, 2))


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


def _rms_normalized(module: nn.Module, x: Tensor) -> Tensor:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _is_rmsnorm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "weight")


class GhostRecorder:
    """Records per-sequence factors of every use of the parameter set during one forward and
    backward, then returns inner products of per-sequence gradients.

    The backward must be of ``sum_i c_i f_i``; pass ``scale=c`` (N,) when ``c`` is not all ones
    (e.g. the coefficients of a training loss) and the factors are divided by it, so the results
    are those of the unit gradients ``grad f_i``. A sequence with ``|c_i| < 1e-12`` gets NaN.
    :attr:`row_seq` maps 2-D layer inputs (the output head applied to selected positions) to
    their sequence: set it before the forward. With ``keep_outputs=False`` the caller runs its
    own backward (e.g. a training step's ``loss.backward()``) instead of :meth:`backward`.
    """

    def __init__(self, model: nn.Module, params: ParamSpec = None, keep_outputs: bool = True):
        self.named = parameter_set(model, params)
        self.param_ids = {id(p): n for n, p in self.named}
        self.uses: dict[int, list[_Use]] = defaultdict(list)  # shared parameters only
        self.targets: dict[str, tuple[Tensor, Tensor]] = {}
        self.totals: dict[str, Tensor] = {}
        self._gram_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self.outputs: list[Tensor] = []  # for backward(); off when the caller back-propagates
        self.keep_outputs = keep_outputs
        self.handles: list = []
        self.row_seq: Tensor | None = None
        self.n_seq: int | None = None
        self.scale: Tensor | None = None
        self.supported: dict[int, bool] = {}
        owners: dict[int, int] = defaultdict(int)
        for module in model.modules():
            own = {id(p) for p in module.parameters(recurse=False)} & self.param_ids.keys()
            if not own:
                continue
            self.handles.append(module.register_forward_hook(self._hook_for(module, own)))
            for pid in own:
                owners[pid] += 1
        self.shared = {pid for pid, n in owners.items() if n > 1}  # e.g. tied embeddings
        missing = [n for n, p in self.named if not self.supported.get(id(p), False)]
        if missing:
            self.close()
            raise TypeError(f"fast statistics cannot handle parameter(s): {', '.join(missing)}")

    def _hook_for(self, module: nn.Module, own: set[int]) -> Callable:
        kind = type(module).__name__
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        supported: set[int] = set()
        if isinstance(module, nn.Linear) or kind == "Conv1D":
            supported = {id(weight)} | ({id(bias)} if bias is not None else set())
        elif isinstance(module, nn.Embedding):
            supported = {id(weight)}
        elif isinstance(module, nn.LayerNorm) or _is_rmsnorm(module):
            supported = {id(weight)} | ({id(bias)} if bias is not None else set())
        for pid in own:
            self.supported[pid] = self.supported.get(pid, True) and pid in supported

        def forward_hook(mod: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, Tensor):
                return
            saved = [inputs[0].detach()]  # released once used, like autograd's saved tensors

            def grad_hook(grad: Tensor) -> None:
                self._record(mod, kind, own, saved.pop(), grad.detach())

            if output.requires_grad:
                output.register_hook(grad_hook)
                if self.keep_outputs:
                    self.outputs.append(output)

        return forward_hook

    def _rows(self, t: Tensor) -> Tensor:
        """(N, T, D) per-sequence rows of a layer input or output gradient, in float32 or
        float64 (half precisions are promoted); per-pair sums are accumulated in float64."""
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

    def _unit(self, g: Tensor) -> Tensor:
        if self.scale is None:
            return g
        c = self.scale.to(g).reshape(-1, *([1] * (g.dim() - 1)))
        return torch.where(c.abs() > 1e-12, g / c, torch.full_like(g, torch.nan))

    def _record(self, mod: nn.Module, kind: str, own: set[int], x: Tensor, grad: Tensor) -> None:
        g = self._unit(self._rows(grad))
        weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
        if isinstance(mod, nn.Embedding):
            self._add(id(weight), _Use(ids=self._rows(x[..., None])[..., 0].long(), right=g))
            return
        if isinstance(mod, nn.LayerNorm) or _is_rmsnorm(mod):
            if isinstance(mod, nn.LayerNorm):
                xhat = nn.functional.layer_norm(x, mod.normalized_shape, eps=mod.eps)
            else:
                xhat = _rms_normalized(mod, x)
            if id(weight) in own:
                self._add(id(weight), _Use(vec=(g * self._rows(xhat)).sum(1)))
        else:
            a = self._rows(x)
            if id(weight) in own:
                left, right = (a, g) if kind == "Conv1D" else (g, a)
                use = _Use(left=left, right=right)
                self._add(id(weight), use if id(weight) in self.shared else _materialize(use))
        if bias is not None and id(bias) in own:
            self._add(id(bias), _Use(vec=g.sum(1)))

    def expect(self, **targets: tuple[Tensor, Tensor]) -> None:
        """Name the inner products to compute, before the backward: ``name=(ii, jj)`` asks for
        ``<grad f_ii[k], grad f_jj[k]>`` for every k. Each layer's contribution is reduced as
        soon as its gradient arrives, so nothing per layer outlives its hook (except the factors
        of shared parameters, e.g. tied embeddings, whose cross terms need both uses)."""
        self.targets = {k: (ii.long(), jj.long()) for k, (ii, jj) in targets.items()}
        self.totals = {
            k: torch.zeros(len(ii), dtype=torch.float64) for k, (ii, _) in self.targets.items()
        }

    def _add(self, pid: int, use: _Use) -> None:
        if not self.targets:
            raise RuntimeError("GhostRecorder.expect(...) must be called before the backward")
        if pid in self.shared:
            self.uses[pid].append(use)
            return
        for key, (ii, jj) in self.targets.items():
            if use.vec is not None or use.ids is not None:
                value = _use_inner(use, use, ii, jj)
            else:  # q, k, v (and gate, up) share their input: reuse its Gram matrix
                value = (self._gram_of(use.left, key) * self._gram_of(use.right, key)).sum((1, 2))
            self.totals[key] += value.double().cpu()

    def _gram_of(self, t: Tensor, key: str) -> Tensor:
        """``_gram(t[ii], t[jj])``, reused when the previous call of ``key`` saw the same rows
        (same storage and shape). The cache holds that tensor, so its storage cannot be freed
        and handed to a different tensor while the entry lives."""
        held = self._gram_cache.get(key)
        if held is not None and held[0].data_ptr() == t.data_ptr() and held[0].shape == t.shape:
            return held[1]
        ii, jj = self.targets[key]
        gram = _gram(t[ii], t[jj])
        self._gram_cache[key] = (t, gram)
        return gram

    def results(self) -> dict[str, Tensor]:
        """The requested inner products (float64), summed over the parameter set."""
        out = {k: v.clone() for k, v in self.totals.items()}
        for uses in self.uses.values():  # shared parameters: every pair of uses
            for u in uses:
                for v in uses:
                    for key, (ii, jj) in self.targets.items():
                        out[key] += _use_inner(u, v, ii, jj).double().cpu()
        return out

    def backward(self, value: Tensor) -> None:
        """Back-propagate ``value`` to the recorded layer outputs only: the hooks see every
        output gradient, and no parameter gradient is computed or stored."""
        outputs, self.outputs = self.outputs, []
        torch.autograd.grad(value, outputs, allow_unused=True)

    def expect_pairs(self, n_pairs: int) -> None:
        """Ask for ``norm2_chosen``, ``norm2_rejected`` and ``inner`` of sequences laid out as
        ``[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]``."""
        w = torch.arange(n_pairs)
        self.expect(
            norm2_chosen=(w, w), norm2_rejected=(w + n_pairs, w + n_pairs), inner=(w, w + n_pairs)
        )

    def clear(self) -> None:
        self.uses.clear()
        self.outputs.clear()
        self.targets, self.totals, self._gram_cache = {}, {}, {}

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> GhostRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fast_gradient_stats(
    model: nn.Module, chosen: SequenceBatch, rejected: SequenceBatch, params: ParamSpec = None
) -> dict[str, Tensor]:
    """Same result as :func:`ge_utils.gradients.exact_gradient_stats`, from one forward and one
    backward over the 2B sequences. Eval mode; parameter ``.grad`` fields are left untouched."""
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected sequences")
    joint = concat_batches(chosen, rejected)
    was_training = model.training
    model.eval()
    try:
        with GhostRecorder(model, params) as rec:
            rec.n_seq = len(joint)
            rec.row_seq = target_positions(joint)[0]
            u = sequence_logprobs(model, joint)
            rec.expect_pairs(len(chosen))
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
    """(T_w, T_l) float64 matrix of ``<grad log p(y_w,s), grad log p(y_l,t)>`` for ONE pair.

    ``scope='head'``: over the output layer's weight (and bias) only, in closed form from one
    forward: the head gradient of token t's log-prob is ``(e_y - p_t) h_t^T``. ``scope='all'``:
    over the parameter set, exact, from one forward and backward over ``T_w + T_l`` copies of the
    two sequences, copy k back-propagating only its own token (no gradient vector is stored).
    """
    if len(chosen) != 1 or len(rejected) != 1:
        raise ValueError("tokenwise_inner takes one chosen and one rejected sequence")
    was_training = model.training
    model.eval()
    try:
        if scope == "head":
            return _tokenwise_head(model, chosen, rejected)
        if scope != "all":
            raise ValueError(f"scope must be 'head' or 'all', got {scope!r}")
        t_w, t_l = int(chosen.response_lengths[0]), int(rejected.response_lengths[0])
        joint = concat_batches(_replicate(chosen, t_w), _replicate(rejected, t_l))
        with GhostRecorder(model, params) as rec:
            rec.n_seq = len(joint)
            rec.row_seq = target_positions(joint)[0]
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
    from ge_utils.logprobs import hidden_states, unwrap_model

    head = unwrap_model(model).get_output_embeddings()
    factors = []
    for batch in (chosen, rejected):
        rows, cols = target_positions(batch)
        h = hidden_states(model, batch)[rows, cols].double()
        probs = torch.softmax(head(h.to(head.weight.dtype)).double(), -1)
        g = -probs
        g[torch.arange(len(g)), batch.input_ids[rows, cols + 1]] += 1.0
        factors.append((h, g))
    (h_w, g_w), (h_l, g_l) = factors
    out = (h_w @ h_l.T) * (g_w @ g_l.T)
    if getattr(head, "bias", None) is not None:
        out = out + g_w @ g_l.T
    return out
