"""Response log-probabilities of a causal LM, with prompt and padding masked.

Conventions used across the package:

- A *sequence* is ``prompt_ids + response_ids``; ``u = log pi(response | prompt)`` is the sum of
  the response tokens' log-probs (nats). The length-averaged form divides by the response length.
- :class:`SequenceBatch` holds a padded batch: ``input_ids`` (B, T), ``attention_mask`` (B, T) and
  ``response_mask`` (B, T), True at positions whose *token* belongs to the response. The log-prob
  of the token at position t is read from the logits at position t - 1.
- Position ids are derived from the attention mask, so left and right padding give the same
  numbers.
- Logits are computed only at the positions that predict response tokens: the output layer of a
  49k-token vocabulary dominates the cost otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal
from weakref import WeakKeyDictionary

import torch
from torch import nn

Template = Literal["none", "chat"]
PaddingSide = Literal["left", "right"]


@dataclass
class SequenceBatch:
    """A padded batch of prompt+response sequences.

    ``input_ids``, ``attention_mask``: (B, T) long; ``response_mask``: (B, T) bool.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) number of response tokens per sequence."""
        return self.response_mask.sum(dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        """(B, T) positions counted over non-padding tokens (0 on padding)."""
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    def trimmed(self) -> SequenceBatch:
        """The batch without the columns that are padding in every row (e.g. the padding of a
        larger batch that ``select`` kept): the same log-probs from fewer positions."""
        cols = self.attention_mask.bool().any(0).nonzero().flatten()
        if len(cols) == 0 or len(cols) == self.attention_mask.shape[1]:
            return self
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        return SequenceBatch(
            self.input_ids[:, lo:hi], self.attention_mask[:, lo:hi], self.response_mask[:, lo:hi]
        )

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device)
        )

    def select(self, index: Sequence[int] | torch.Tensor) -> SequenceBatch:
        """Sub-batch of the given rows (padding columns are kept)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        return SequenceBatch(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx])


def concat_batches(a: SequenceBatch, b: SequenceBatch) -> SequenceBatch:
    """Rows of ``a`` then rows of ``b``, right-padding the narrower one (with id 0, masked)."""
    width = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=0)

    return SequenceBatch(
        torch.cat([pad(a.input_ids), pad(b.input_ids)]),
        torch.cat([pad(a.attention_mask), pad(b.attention_mask)]),
        torch.cat([pad(a.response_mask), pad(b.response_mask)]),
    )


def prompt_ids(tokenizer, prompt: str, template: Template = "none") -> list[int]:
    """Token ids of a prompt: raw (``tokenizer(prompt)``) or through the chat template."""
    if template == "none":
        return list(tokenizer(prompt).input_ids)
    if template == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("template='chat' but the tokenizer has no chat template")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    raise ValueError(f"unknown template {template!r}; expected 'none' or 'chat'")


def response_ids(tokenizer, response: str) -> list[int]:
    """Token ids of a response, without special tokens."""
    return list(tokenizer(response, add_special_tokens=False).input_ids)


def build_batch(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    padding_side: PaddingSide = "right",
) -> SequenceBatch:
    """Pad ``(prompt_ids, response_ids)`` pairs into a :class:`SequenceBatch`."""
    if len(sequences) == 0:
        raise ValueError("cannot build a batch from zero sequences")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    for i, (p, r) in enumerate(sequences):
        if len(r) == 0:
            raise ValueError(f"sequence {i}: empty response")
        if len(p) == 0:
            raise ValueError(
                f"sequence {i}: empty prompt (need at least one token to condition on)"
            )
    width = max(len(p) + len(r) for p, r in sequences)
    b = len(sequences)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    response = torch.zeros((b, width), dtype=torch.bool)
    for i, (p, r) in enumerate(sequences):
        n = len(p) + len(r)
        start = 0 if padding_side == "right" else width - n
        input_ids[i, start : start + n] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention[i, start : start + n] = 1
        response[i, start + len(p) : start + n] = True
    return SequenceBatch(input_ids, attention, response)


def check_texts(**texts: Sequence[str]) -> None:
    """Raise TypeError, naming the argument (the keyword) and the position, unless each value is
    a sized collection (list, tuple, Series, ...) of strings: a single ``str`` (which would be
    read one character at a time) or an element that is not a ``str`` (e.g. None) is refused."""
    for name, values in texts.items():
        if isinstance(values, str | bytes) or not hasattr(values, "__len__"):
            raise TypeError(
                f"{name} must be a sequence (e.g. a list) of strings, "
                f"got {type(values).__name__} {values!r:.60}"
            )
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise TypeError(
                    f"{name}[{i}] must be a str, got {type(value).__name__} {value!r:.60}"
                )


def tokenize(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    template: Template = "none",
    padding_side: PaddingSide = "right",
) -> SequenceBatch:
    """Tokenize prompt/response strings into a :class:`SequenceBatch`.

    With ``template='none'`` the ids are ``tokenizer(prompt).input_ids +
    tokenizer(response, add_special_tokens=False).input_ids``; with ``'chat'`` the prompt goes
    through the tokenizer's chat template as a user turn with the generation prompt appended.
    Raises TypeError unless ``prompts`` and ``responses`` are sequences of strings
    (:func:`check_texts`).
    """
    check_texts(prompts=prompts, responses=responses)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    pad = pad_id(tokenizer)
    seqs = [
        (prompt_ids(tokenizer, p, template), response_ids(tokenizer, r))
        for p, r in zip(prompts, responses, strict=True)
    ]
    return build_batch(seqs, pad, padding_side)


def pad_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its eos token, else 0.

    Padded positions are masked out of attention and of every log-prob, so the choice never
    changes a result; one policy keeps batches built anywhere in the package identical.
    """
    for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pid is not None:
            return int(pid)
    return 0


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (dropout off) inside the block; its previous train/eval mode is
    restored on leaving, also on an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model (unwraps peft's ``PeftModel``)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")
_POSITION_LIMITS: WeakKeyDictionary[nn.Module, int | None] = WeakKeyDictionary()


def position_limit(model: nn.Module) -> int | None:
    """The most tokens a sequence may have for ``model``: its config's ``n_positions`` (else
    ``max_position_embeddings``) when it has a learned absolute position table (a
    ``nn.Embedding`` named ``wpe``, ``embed_positions`` or ``position_embeddings``: GPT-2,
    OPT, ...); None for models without one (rotary or ALiBi positions: Llama, ...), whose
    ``max_position_embeddings`` is no hard limit. Found once per model object."""
    lm = unwrap_model(model)
    if lm not in _POSITION_LIMITS:
        learned = any(
            isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES
            for name, module in lm.named_modules()
        )
        config = lm.config.get_text_config()
        limits = [getattr(config, k, None) for k in ("n_positions", "max_position_embeddings")]
        found = [int(v) for v in limits if v is not None]
        _POSITION_LIMITS[lm] = found[0] if learned and found else None
    return _POSITION_LIMITS[lm]


def check_batch_fits(model: nn.Module, batch: SequenceBatch) -> None:
    """Raise ValueError when ``batch`` holds a token id outside the model's input embedding
    (``0 <= id < vocabulary size``) or, for a model with learned absolute positions
    (:func:`position_limit`), a sequence longer than its position table: torch would fail
    with a bare ``IndexError`` deep in the forward."""
    lm = unwrap_model(model)
    embed = lm.get_input_embeddings()
    vocab = getattr(embed, "num_embeddings", None)
    ids = batch.input_ids
    if ids.numel() == 0:
        return
    lowest, highest, longest = torch.stack(
        [ids.min(), ids.max(), batch.attention_mask.sum(dim=1).max().to(ids.dtype)]
    ).tolist()
    if lowest < 0 or (vocab is not None and highest >= vocab):
        bad = lowest if lowest < 0 else highest
        raise ValueError(
            f"token id {bad} is outside the model's vocabulary of {vocab} ids (0 to {vocab - 1}): "
            "were these ids made by another tokenizer?"
        )
    limit = position_limit(lm)
    if limit is not None and longest > limit:
        raise ValueError(
            f"the longest sequence has {longest} tokens but {type(lm).__name__} takes at most "
            f"{limit} (its learned position embeddings); shorten the prompts or responses"
        )


def hidden_states(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """(B, T, H) last hidden states (after the final norm) of a Hugging Face causal LM.

    Raises ValueError, before the forward, on a token id outside the vocabulary or a sequence
    longer than a learned position table (:func:`check_batch_fits`)."""
    check_batch_fits(model, batch)
    lm = unwrap_model(model)
    body = getattr(lm, lm.base_model_prefix, None) if hasattr(lm, "base_model_prefix") else None
    if body is None:
        raise TypeError(f"cannot find the decoder body of {type(lm).__name__}")
    out = body(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def target_positions(batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices (each (N,)) of the positions whose logits predict response tokens.

    Entry k predicts token ``input_ids[rows[k], cols[k] + 1]``; entries are in row-major order.
    """
    predicts = torch.zeros_like(batch.response_mask)
    predicts[:, :-1] = batch.response_mask[:, 1:]
    if batch.response_mask[:, 0].any():
        raise ValueError("a response token sits at position 0: it has no context to predict it")
    rows, cols = predicts.nonzero(as_tuple=True)
    return rows, cols


_LOGITS_CHECKED: WeakKeyDictionary[nn.Module, bool] = WeakKeyDictionary()


def output_logits(model: nn.Module, h: torch.Tensor, head: bool = True) -> torch.Tensor:
    """The logits a Hugging Face causal LM computes from final hidden states ``h`` (..., H): its
    output layer, then what its class applies after it, read from the config: ``logit_scale``
    (Cohere: times), ``logits_scaling`` (Granite: divided by), ``final_logit_softcapping``
    (Gemma 2: ``c tanh(z / c)``). With ``head=False``, ``h`` is the output layer's output
    already and only the transform is applied. :func:`check_output_logits` compares them, once
    per model, with the model's own forward."""
    lm = unwrap_model(model)
    logits = lm.get_output_embeddings()(h) if head else h
    config = lm.config.get_text_config()
    if (scale := getattr(config, "logit_scale", None)) is not None:
        logits = logits * scale
    if (scaling := getattr(config, "logits_scaling", None)) is not None:
        logits = logits / scaling
    if (cap := getattr(config, "final_logit_softcapping", None)) is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def check_output_logits(model: nn.Module) -> None:
    """Raise unless :func:`output_logits` of the model's last hidden states are its own logits
    (on a few tokens, in eval mode, without gradients; once per model object): a class that
    transforms its logits in a way this package does not know would otherwise get wrong
    log-probs without a word. Raises ValueError when those logits are not finite (NaN or inf
    weights)."""
    lm = unwrap_model(model)
    if lm in _LOGITS_CHECKED:
        return
    if lm.get_output_embeddings() is None:
        raise TypeError(f"{type(lm).__name__} has no output layer (get_output_embeddings)")
    param = next(lm.parameters())
    vocab = getattr(lm.config.get_text_config(), "vocab_size", None) or 2
    ids = torch.arange(min(vocab, 6), device=param.device)[None]
    probe = SequenceBatch(ids, torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool))
    with torch.no_grad(), eval_mode(lm):
        ours = output_logits(lm, hidden_states(lm, probe)).float()
        theirs = lm(input_ids=ids, attention_mask=probe.attention_mask, use_cache=False)
        theirs = theirs.logits.float()
    if not bool(torch.isfinite(theirs).all() and torch.isfinite(ours).all()):
        raise ValueError(
            f"the model's logits are not finite (NaN or inf): {type(lm).__name__} has "
            "non-finite weights, or its computation overflows in this dtype"
        )
    tol = 1e-2 if param.element_size() < 4 else 1e-4
    close = ours.shape == theirs.shape and torch.allclose(
        ours, theirs, rtol=tol, atol=tol * float(theirs.abs().max())
    )
    if not close:
        raise TypeError(
            f"{type(lm).__name__} computes its logits in a way this package does not reproduce "
            "(they are not its output layer applied to its last hidden states, with the "
            "logit scale, scaling or soft-capping of its config): its log-probs would be wrong"
        )
    _LOGITS_CHECKED[lm] = True


def token_logprobs(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """(B, T) log-probs of each response token (0 at prompt and padding positions).

    Entry ``[b, t]`` is ``log pi(input_ids[b, t] | input_ids[b, :t])`` where
    ``response_mask[b, t]``; logits are computed only at those positions
    (:func:`output_logits`, checked once per model by :func:`check_output_logits`).
    """
    check_output_logits(model)
    h = hidden_states(model, batch)
    rows, cols = target_positions(batch)
    logits = output_logits(model, h[rows, cols])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
    targets = batch.input_ids[rows, cols + 1]
    lp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    out = torch.zeros(batch.input_ids.shape, dtype=lp.dtype, device=lp.device)
    out = out.index_put((rows, cols + 1), lp)
    return out


def sequence_logprobs(
    model: nn.Module, batch: SequenceBatch, average: bool = False
) -> torch.Tensor:
    """(B,) summed (or, with ``average=True``, length-averaged) response log-probs, in nats."""
    total = token_logprobs(model, batch).sum(dim=1)
    if average:
        total = total / batch.response_lengths.to(total.dtype)
    return total


class _Logps(nn.Module):
    """Summed response log-probs of a batch as a module call (for ``functional_call``)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, batch: SequenceBatch) -> torch.Tensor:
        return sequence_logprobs(self.inner, batch)


def directional_logps(
    model: nn.Module,
    batch: SequenceBatch,
    at: Mapping[str, torch.Tensor],
    direction: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, g . v)``: summed response log-probs ``u`` (B,) of ``batch`` with the named
    parameters of ``model`` set to ``at``, and their exact directional derivatives along
    ``direction`` (same names), without changing the model or any ``.grad``.

    Forward-mode AD (one forward, attention through PyTorch's math kernel, which supports it);
    where the model has an operation without a forward-mode derivative, one reverse-mode
    gradient per sequence instead. Eval mode."""
    wrapper = _Logps(model)
    names = list(at)

    def call(values: Sequence[torch.Tensor]) -> torch.Tensor:
        params = {"inner." + n: v for n, v in zip(names, values, strict=True)}
        return torch.func.functional_call(wrapper, params, (batch,))

    primals = tuple(at[n] for n in names)
    tangents = tuple(direction[n].to(at[n]) for n in names)  # its dtype and device
    with eval_mode(model):
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                u, du = torch.func.jvp(call, (primals,), (tangents,))
            return u.detach(), du.detach()
        except (NotImplementedError, RuntimeError):
            pass
        leaves = [p.detach().requires_grad_(True) for p in primals]
        u = call(leaves)
        dots = []
        for i in range(len(u)):
            grads = torch.autograd.grad(
                u[i], leaves, retain_graph=i + 1 < len(u), allow_unused=True
            )
            dots.append(
                sum(
                    (g.double() * t.double()).sum()
                    for g, t in zip(grads, tangents, strict=True)
                    if g is not None
                )
            )
        dots64 = [torch.as_tensor(d, dtype=torch.float64, device=u.device) for d in dots]
        return u.detach(), torch.stack(dots64).to(u.dtype)
