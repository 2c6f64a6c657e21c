"""Fast TrOCR decoding: greedy and beam search written directly on the model's own modules.

Why not ``generate``: per step it pays for generic machinery (cache objects, mask builders, logits
processors, stopping criteria), expands the encoder output once per beam, and keeps finished lines in
the batch until the longest one ends. This engine runs the encoder once per line, projects each
line's cross-attention keys/values once (its beams share them), writes self-attention keys/values into
one preallocated cache, and drops finished lines from the running batch (greedy: a quarter at a time).
A keep-aspect line is read over its own ink only (:func:`encode_lines`).

It repeats the arithmetic of ``TrOCRDecoder`` (post-norm layers, scaled queries, learned or sinusoidal
positions) and the bookkeeping of ``GenerationMixin._beam_search`` op for op, so in fp32 it returns the
texts ``generate`` returns. The fused q/k/v weights are merged once, when the engine is built: an
engine sees the weights as they were then, so one that reads a model in training is built anew.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (AutoConfig, GenerationConfig, LogitsProcessor, LogitsProcessorList, PretrainedConfig,
                          VisionEncoderDecoderModel)
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.trocr.modeling_trocr import TrOCRSinusoidalPositionalEmbedding

from operators.checkpoint import resolve_checkpoint
from operators.errors import ModelLoadError
from operators.utf8 import Utf8Guard

#: Generation settings that make ``generate`` add logits processors this engine does not implement.
UNSUPPORTED_GENERATION_SETTINGS = (
    "min_length", "min_new_tokens", "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "forced_bos_token_id", "forced_eos_token_id",
    "suppress_tokens", "begin_suppress_tokens", "exponential_decay_length_penalty", "renormalize_logits",
    "remove_invalid_values", "num_beam_groups", "diversity_penalty", "num_return_sequences",
)
#: HF's stand-in for minus infinity in beam bookkeeping; the same constant keeps tie-breaks identical.
NEG_LARGE = -1.0e9


@dataclass(frozen=True)
class DecodedLine:
    tokens: list[int]  # generated ids after the start token, through the first end-of-sequence id
    confidence: float  # geometric mean of the chosen tokens' probabilities, 0..1
    truncated: bool  # no end-of-sequence within max_new_tokens
    logprobs: tuple[float, ...] = ()  # each token's log-probability, for word confidences


def sequence_confidence(token_logprobs: torch.Tensor) -> float:
    """Geometric mean of the token probabilities; -inf scores (masked tokens) are left out."""
    finite = token_logprobs[torch.isfinite(token_logprobs)]
    return float(torch.exp(finite.mean())) if len(finite) else 0.0


def hf_generate(model: VisionEncoderDecoderModel, pixel_values: torch.Tensor, num_beams: int,
                max_new_tokens: int, encoder_dtype: torch.dtype | None = None,
                logits_processor: LogitsProcessor | None = None,
                utf8_guard: Utf8Guard | None = None) -> list[DecodedLine]:
    """The same lines decoded by transformers ``generate`` (engine "hf"): the reference this engine must equal.
    ``encoder_dtype``: the encoder runs under autocast to it (see :func:`encoder_autocast`).
    ``logits_processor``: an extra one; ``generate`` records the scores after it, so unlike the engine's its
    confidences include what the processor added. ``utf8_guard``: applied first, as the engine applies it."""
    processors = [processor for processor in (utf8_guard, logits_processor) if processor is not None]
    with torch.inference_mode():
        output = model.generate(
            pixel_values=pixel_values,
            **generate_encoder_outputs(model, pixel_values, encoder_dtype),
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            output_scores=True,
            return_dict_in_generate=True,
            logits_processor=LogitsProcessorList(processors),
        )
        token_logprobs = model.compute_transition_scores(
            output.sequences, output.scores, getattr(output, "beam_indices", None), normalize_logits=num_beams == 1
        )
    generated = output.sequences[:, -token_logprobs.shape[1]:]
    eos_ids = _as_list(model.generation_config.eos_token_id)
    return [_decoded_line(tokens, logprobs, eos_ids)
            for tokens, logprobs in zip(generated.tolist(), token_logprobs.float().cpu())]


def encoder_autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` for the encoder's forward pass (bf16 on the CPU, ``operators.model``); None: none."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def generate_encoder_outputs(model: VisionEncoderDecoderModel, pixel_values: torch.Tensor,
                             encoder_dtype: torch.dtype | None) -> dict[str, BaseModelOutput]:
    """``generate`` keyword arguments that hand it the encoder's output computed under ``encoder_dtype``
    autocast (``generate`` would run the encoder itself without it); none without one."""
    if encoder_dtype is None:
        return {}
    with encoder_autocast(encoder_dtype, pixel_values.device):
        memory = model.encoder(pixel_values=pixel_values).last_hidden_state
    return {"encoder_outputs": BaseModelOutput(last_hidden_state=memory.to(pixel_values.dtype))}


def _decoded_line(tokens: list[int], logprobs: torch.Tensor, eos_ids: list[int]) -> DecodedLine:
    """Cut a generated row after its first end-of-sequence id (what follows is padding)."""
    ends = [index for index, token in enumerate(tokens) if token in eos_ids]
    length = ends[0] + 1 if ends else len(tokens)
    return DecodedLine(tokens[:length], sequence_confidence(logprobs[:length]), truncated=not ends,
                       logprobs=tuple(logprobs[:length].tolist()))


def _as_list(ids: int | list[int]) -> list[int]:
    return [ids] if isinstance(ids, int) else list(ids)


@dataclass(frozen=True)
class _Norm:
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class _LayerWeights:
    """One TrOCRDecoderLayer as plain tensors; q/k/v of self-attention and k/v of cross-attention fused."""

    self_qkv: tuple[torch.Tensor, torch.Tensor]
    self_out: tuple[torch.Tensor, torch.Tensor]
    self_norm: _Norm
    cross_q: tuple[torch.Tensor, torch.Tensor]
    cross_kv: tuple[torch.Tensor, torch.Tensor]
    cross_out: tuple[torch.Tensor, torch.Tensor]
    cross_norm: _Norm
    fc1: tuple[torch.Tensor, torch.Tensor]
    fc2: tuple[torch.Tensor, torch.Tensor]
    final_norm: _Norm
    activation: torch.nn.Module


class _Cache:
    """Self-attention keys/values of all layers in one tensor (layers, 2, rows, heads, max_len, head_dim)."""

    def __init__(self, layers: int, rows: int, heads: int, max_len: int, head_dim: int, like: torch.Tensor):
        self.tensor = like.new_empty((layers, 2, rows, heads, max_len, head_dim))

    def keep_rows(self, rows: torch.Tensor, filled: int) -> None:
        """Reorder/compact to ``rows`` (beam parents, surviving lines); only the ``filled`` steps are copied."""
        kept = self.tensor[:, :, rows, :, :filled]
        if len(rows) != self.tensor.shape[2]:
            shape = list(self.tensor.shape)
            shape[2] = len(rows)
            self.tensor = self.tensor.new_empty(shape)
        self.tensor[:, :, :, :, :filled] = kept


#: Greedy decoding drops finished lines from the batch once this share of its rows has finished.
COMPACT_SHARE = 0.25


class DecodingEngine:
    """Greedy and beam-search decoding of a VisionEncoderDecoder TrOCR model (ViT/DeiT encoder)."""

    def __init__(self, model: VisionEncoderDecoderModel, encoder_dtype: torch.dtype | None = None):
        """``encoder_dtype``: the encoder runs under autocast to it (see :func:`encoder_autocast`)."""
        check_decoder_type(model.config.decoder.model_type)
        decoder = model.decoder.model.decoder
        config = model.config.decoder
        self.model = model
        self.encoder_dtype = encoder_dtype
        self.decoder = decoder
        self.heads = config.decoder_attention_heads
        self.hidden = config.hidden_size
        self.head_dim = self.hidden // self.heads
        self.scaling = self.head_dim ** -0.5
        self.learned_positions = bool(config.use_learned_position_embeddings)
        # generate() fails with an IndexError past the learned positions; here such lines end truncated
        self.max_positions = (len(decoder.embed_positions.weight) - decoder.embed_positions.offset
                              if self.learned_positions else sys.maxsize)
        self.generation = _effective_generation_settings(model.generation_config)
        self.start_id = _required_id(self.generation, "decoder_start_token_id")
        self.pad_id = _required_id(self.generation, "pad_token_id")
        self.eos_ids = _as_list(_required_id(self.generation, "eos_token_id"))
        with torch.no_grad():  # merged once: an engine sees the weights as they were when it was built
            self.weights = self._layer_weights()

    def decode(self, pixel_values: torch.Tensor, num_beams: int, max_new_tokens: int,
               line_widths: Sequence[int] | None = None, logits_processor: LogitsProcessor | None = None,
               utf8_guard: Utf8Guard | None = None) -> list[DecodedLine]:
        """(N, 3, H, W) encoder input -> N decoded lines, in input order; greedy when ``num_beams`` is 1.

        ``line_widths``: see :func:`encode_lines`. ``logits_processor``: applied to each beam step's
        log-probabilities as ``generate`` applies it (e.g. :class:`operators.lexicon.WordFrequencyBias`), and
        it must return a new tensor: its scores rank the beams, while the tokens' log-probabilities (the
        confidences) stay the model's. ``utf8_guard``: keeps byte-level tokens to whole characters
        (:mod:`operators.utf8`), applied before ``logits_processor`` and, in greedy search, before the
        confidences, as ``generate`` applies it."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (lines, 3, height, width), got {tuple(pixel_values.shape)}")
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError(f"num_beams and max_new_tokens must be >= 1, got {num_beams} and {max_new_tokens}")
        if logits_processor is not None and num_beams == 1:
            raise ValueError("a logits processor ranks beams here: it needs num_beams >= 2")
        if len(pixel_values) == 0:
            return []
        max_new_tokens = min(max_new_tokens, self.max_positions)
        with torch.inference_mode():
            weights = self.weights
            cross, cross_bias = self._cross_keys_values(pixel_values, weights, line_widths)
            positions = self._position_table(max_new_tokens, cross.dtype, cross.device)
            if num_beams == 1:
                tokens, logprobs = self._greedy(weights, cross, cross_bias, positions, max_new_tokens, utf8_guard)
            else:
                tokens, logprobs = self._beam_search(weights, cross, cross_bias, positions, num_beams, max_new_tokens,
                                                     logits_processor, utf8_guard)
        return [_decoded_line(row, row_logprobs, self.eos_ids) for row, row_logprobs in zip(tokens.tolist(), logprobs)]

    # -- model pieces --------------------------------------------------------------------------------

    def _layer_weights(self) -> list[_LayerWeights]:
        return [_layer_weights(layer) for layer in self.decoder.layers]

    def _cross_keys_values(self, pixel_values: torch.Tensor, weights: list[_LayerWeights],
                           line_widths: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder once, then every layer's cross-attention keys/values: (layers, 2, lines, heads, src, head_dim),
        and with ``line_widths`` the additive cross-attention mask of each line's own patches (lines, 1, 1, src)."""
        with encoder_autocast(self.encoder_dtype, pixel_values.device):
            memory, own_patches = encode_lines(self.model.encoder, pixel_values, line_widths)
        memory = memory.to(pixel_values.dtype)
        projection = getattr(self.model, "enc_to_dec_proj", None)  # exists exactly when the forward pass uses it
        if projection is not None:
            memory = projection(memory)
        lines, source = memory.shape[:2]
        per_layer = [F.linear(memory, *layer.cross_kv).view(lines, source, 2, self.heads, self.head_dim)
                     for layer in weights]
        cross = torch.stack(per_layer).permute(0, 3, 1, 4, 2, 5).contiguous()
        if own_patches is None:
            return cross, None
        bias = torch.zeros(own_patches.shape, dtype=memory.dtype, device=memory.device)
        return cross, bias.masked_fill(~own_patches, torch.finfo(memory.dtype).min)[:, None, None, :]

    def _position_table(self, max_new_tokens: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Position embedding of decoder step 0..max_new_tokens-1 (sinusoidal: indexed from the pad id on)."""
        if self.learned_positions:
            table = self.decoder.embed_positions.weight
            offset = self.decoder.embed_positions.offset
            return table[offset:offset + max_new_tokens]
        pad = self.decoder.embed_positions.padding_idx
        table = TrOCRSinusoidalPositionalEmbedding.get_embedding(pad + 1 + max_new_tokens, self.hidden, pad)
        return table.to(device=device, dtype=dtype)

    def _embed(self, tokens: torch.Tensor, step: int, positions: torch.Tensor) -> torch.Tensor:
        embedded = F.embedding(tokens, self.decoder.embed_tokens.weight)
        if self.decoder.embed_tokens.embed_scale != 1.0:
            embedded = embedded * self.decoder.embed_tokens.embed_scale
        if self.learned_positions:
            hidden = embedded + positions[step]
        else:  # HF gives a generated pad token the zero row at padding_idx instead of its step's position
            pad = self.decoder.embed_positions.padding_idx
            hidden = embedded + positions[torch.where(tokens == self.pad_id, pad, pad + 1 + step)]
        if self.decoder.layernorm_embedding is not None:
            hidden = self.decoder.layernorm_embedding(hidden)
        return hidden

    def _step(self, weights: list[_LayerWeights], tokens: torch.Tensor, step: int, positions: torch.Tensor,
              cache: _Cache, cross: torch.Tensor, cross_bias: torch.Tensor | None, beams: int) -> torch.Tensor:
        """One decoder step for the running rows (lines x beams); returns fp32 logits (rows, vocab)."""
        hidden = self._embed(tokens, step, positions)
        rows = len(tokens)
        for layer, (keys, values), (cross_keys, cross_values) in zip(weights, cache.tensor, cross):
            query, key, value = F.linear(hidden, *layer.self_qkv).split(self.hidden, dim=-1)
            keys[:, :, step] = key.view(rows, self.heads, self.head_dim)
            values[:, :, step] = value.view(rows, self.heads, self.head_dim)
            query = (query * self.scaling).view(rows, self.heads, 1, self.head_dim)
            attended = _attend(query, keys[:, :, :step + 1], values[:, :, :step + 1])
            hidden = layer.self_norm(hidden + F.linear(attended.reshape(rows, self.hidden), *layer.self_out))

            query = F.linear(hidden, *layer.cross_q) * self.scaling
            query = query.view(rows // beams, beams, self.heads, self.head_dim).transpose(1, 2)
            attended = _attend(query, cross_keys, cross_values, cross_bias).transpose(1, 2)
            hidden = layer.cross_norm(hidden + F.linear(attended.reshape(rows, self.hidden), *layer.cross_out))

            feed_forward = F.linear(layer.activation(F.linear(hidden, *layer.fc1)), *layer.fc2)
            hidden = layer.final_norm(hidden + feed_forward)
        return F.linear(hidden, self.model.decoder.output_projection.weight).float()

    # -- search ----------------------------------------------------------------------------------------

    def _greedy(self, weights: list[_LayerWeights], cross: torch.Tensor, cross_bias: torch.Tensor | None,
                positions: torch.Tensor, max_new_tokens: int,
                utf8_guard: Utf8Guard | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Argmax per step; finished lines leave the batch (and its cache rows) once a quarter of the rows
        have finished (:data:`COMPACT_SHARE`): compacting copies the cache, so not on every line's end."""
        lines, device = cross.shape[2], cross.device
        out_tokens = torch.full((lines, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        out_logprobs = torch.zeros((lines, max_new_tokens), dtype=torch.float32, device=device)
        running = torch.arange(lines, device=device)  # input line of each row
        live = torch.ones(lines, dtype=torch.bool, device=device)  # rows whose line has not ended
        tokens = torch.full((lines,), self.start_id, dtype=torch.long, device=device)
        cache = self._new_cache(lines, max_new_tokens, cross)
        eos = torch.tensor(self.eos_ids, device=device)
        utf8_states = utf8_guard.start(lines, device) if utf8_guard is not None else None
        for step in range(max_new_tokens):
            logits = self._step(weights, tokens, step, positions, cache, cross, cross_bias, beams=1)
            if utf8_guard is not None:
                logits = utf8_guard.mask(utf8_states, logits)
            tokens = logits.argmax(dim=-1)
            rows = live.nonzero().squeeze(1)
            out_tokens[running[rows], step] = tokens[rows]
            out_logprobs[running[rows], step] = logits[rows].log_softmax(dim=-1).gather(1, tokens[rows, None]).squeeze(1)
            live &= ~torch.isin(tokens, eos)
            if utf8_guard is not None:
                utf8_states = utf8_guard.advance(utf8_states, tokens)
            remaining = int(live.sum())
            if remaining == 0:
                break
            if step + 1 < max_new_tokens and len(live) - remaining >= COMPACT_SHARE * len(live):
                keep = live.nonzero().squeeze(1)
                running, tokens, cross, live = running[keep], tokens[keep], cross[:, :, keep], live[keep]
                cross_bias = cross_bias[keep] if cross_bias is not None else None
                utf8_states = utf8_states[keep] if utf8_states is not None else None
                cache.keep_rows(keep, step + 1)
        return out_tokens, out_logprobs.cpu()

    def _beam_search(self, weights: list[_LayerWeights], cross: torch.Tensor, cross_bias: torch.Tensor | None,
                     positions: torch.Tensor, beams: int, max_new_tokens: int,
                     logits_processor: LogitsProcessor | None,
                     utf8_guard: Utf8Guard | None) -> tuple[torch.Tensor, torch.Tensor]:
        """HF beam search per line (same scores, length penalty, early stopping, tie-breaks); a line leaves
        the batch once ``generate`` could no longer change its best finished hypothesis."""
        lines, device = cross.shape[2], cross.device
        search = _BeamState.start(lines, beams, max_new_tokens, self.pad_id, device)
        rules = _BeamRules.from_generation(self.generation, beams, len(self.eos_ids), max_new_tokens, device)
        out_tokens = torch.full((lines, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        out_logprobs = torch.zeros((lines, max_new_tokens), dtype=torch.float32, device=device)
        tokens = torch.full((lines * beams,), self.start_id, dtype=torch.long, device=device)
        cache = self._new_cache(lines * beams, max_new_tokens, cross)
        eos = torch.tensor(self.eos_ids, device=device)
        utf8_states = utf8_guard.start(lines * beams, device) if utf8_guard is not None else None  # per beam
        for step in range(max_new_tokens):
            logits = self._step(weights, tokens, step, positions, cache, cross, cross_bias, beams)
            log_probs = logits.log_softmax(dim=-1)
            scores = log_probs if utf8_guard is None else utf8_guard.mask(utf8_states, log_probs)
            if logits_processor is not None:
                scores = logits_processor(search.sequences(self.start_id, step), scores)
            parents = search.advance(scores, log_probs, step, eos, rules)
            if utf8_guard is not None:  # (lines, beams): each new beam's parent state and its token
                utf8_states = utf8_guard.advance(utf8_states[parents], search.running_tokens[:, :, step])
            last = step + 1 == max_new_tokens
            done = torch.ones_like(search.running, dtype=torch.bool) if last else search.done(rules)
            finished_lines = done.nonzero().squeeze(1)
            out_tokens[search.running[finished_lines]] = search.finished_tokens[finished_lines, 0]
            out_logprobs[search.running[finished_lines]] = search.finished_logprobs[finished_lines, 0]
            keep = (~done).nonzero().squeeze(1)
            if len(keep) == 0:
                break
            if len(keep) != len(search.running):
                search, cross = search.select(keep), cross[:, :, keep]
                cross_bias = cross_bias[keep] if cross_bias is not None else None
            if utf8_states is not None:
                utf8_states = utf8_states[keep].reshape(-1)
            cache.keep_rows(parents[keep].reshape(-1), step + 1)
            tokens = search.running_tokens[:, :, step].reshape(-1)
        return out_tokens, out_logprobs.cpu()

    def _new_cache(self, rows: int, max_new_tokens: int, like: torch.Tensor) -> _Cache:
        return _Cache(len(self.decoder.layers), rows, self.heads, max_new_tokens, self.head_dim, like)


@dataclass(frozen=True)
class _BeamRules:
    """The generation-config knobs of HF beam search, and the constants derived from them."""

    beams: int
    candidates: int  # top-k kept per step: enough that num_beams of them do not end
    top_beam_mask: torch.Tensor  # only the first num_beams candidates may become finished hypotheses
    length_penalty: float
    early_stopping: bool | str
    max_new_tokens: int

    @classmethod
    def from_generation(cls, generation: dict[str, Any], beams: int, eos_count: int, max_new_tokens: int,
                        device: torch.device) -> "_BeamRules":
        candidates = max(2, 1 + eos_count) * beams
        mask = torch.arange(candidates, device=device) < beams
        return cls(beams, candidates, mask, float(generation["length_penalty"]), generation["early_stopping"],
                   max_new_tokens)


@dataclass
class _BeamState:
    """Per running line: its input index, live beams and best finished hypotheses (HF's tensors, per line)."""

    running: torch.Tensor  # (lines,) input line index
    running_tokens: torch.Tensor  # (lines, beams, max_new_tokens)
    running_logprobs: torch.Tensor  # (lines, beams, max_new_tokens) chosen-token log-probabilities
    running_scores: torch.Tensor  # (lines, beams) summed log-probabilities, after any logits processor
    finished_tokens: torch.Tensor
    finished_logprobs: torch.Tensor
    finished_scores: torch.Tensor  # (lines, beams) length-penalised, NEG_LARGE when empty
    finished_flags: torch.Tensor  # (lines, beams) bool
    improvable: torch.Tensor  # (lines, 1) bool: a live beam may still beat the worst finished one

    @classmethod
    def start(cls, lines: int, beams: int, max_new_tokens: int, pad_id: int, device: torch.device) -> "_BeamState":
        tokens = torch.full((lines, beams, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((lines, beams, max_new_tokens), dtype=torch.float32, device=device)
        scores = torch.zeros((lines, beams), dtype=torch.float32, device=device)
        scores[:, 1:] = NEG_LARGE  # all beams start equal: only the first may expand at step 0
        return cls(
            running=torch.arange(lines, device=device),
            running_tokens=tokens, running_logprobs=logprobs, running_scores=scores,
            finished_tokens=tokens.clone(), finished_logprobs=logprobs.clone(),
            finished_scores=torch.full((lines, beams), NEG_LARGE, dtype=torch.float32, device=device),
            finished_flags=torch.zeros((lines, beams), dtype=torch.bool, device=device),
            improvable=torch.ones((lines, 1), dtype=torch.bool, device=device),
        )

    def sequences(self, start_id: int, step: int) -> torch.Tensor:
        """(lines x beams, step + 1): each live beam's tokens so far, the start token first (``generate``'s
        ``input_ids`` for a logits processor)."""
        lines, beams = self.running_scores.shape
        start = torch.full((lines, beams, 1), start_id, dtype=torch.long, device=self.running_tokens.device)
        return torch.cat((start, self.running_tokens[:, :, :step]), dim=2).view(lines * beams, step + 1)

    def advance(self, scores: torch.Tensor, log_probs: torch.Tensor, step: int, eos: torch.Tensor,
                rules: _BeamRules) -> torch.Tensor:
        """Extend every line by one token (HF ``_beam_search`` steps c-g), ranked by ``scores`` (the
        log-probabilities after any logits processor) and recording ``log_probs``; returns the cache row of each new
        live beam's parent, (lines, beams)."""
        lines, beams = self.running_scores.shape
        vocab = log_probs.shape[-1]
        flat_log_probs = log_probs.view(lines, beams * vocab)
        accumulated = (scores.view(lines, beams, vocab) + self.running_scores[:, :, None]).view(lines, -1)
        top_scores, top_indices = torch.topk(accumulated, k=rules.candidates)
        top_parents = top_indices // vocab
        top_ids = top_indices % vocab
        top_tokens = _gather_beams(self.running_tokens, top_parents)
        top_tokens[:, :, step] = top_ids
        top_logprobs = _gather_beams(self.running_logprobs, top_parents)
        top_logprobs[:, :, step] = flat_log_probs.gather(1, top_indices)
        ends = torch.isin(top_ids, eos) | (step + 1 >= rules.max_new_tokens)

        live_scores = top_scores + ends.to(torch.float32) * NEG_LARGE
        live = torch.topk(live_scores, k=beams)[1]
        self.running_tokens = _gather_beams(top_tokens, live)
        self.running_logprobs = _gather_beams(top_logprobs, live)
        self.running_scores = _gather_beams(live_scores, live)
        parents = _gather_beams(top_parents, live) + torch.arange(lines, device=live.device)[:, None] * beams

        self._keep_best_finished(top_tokens, top_logprobs, top_scores, ends, step, rules)
        self._update_improvable(step, rules)
        return parents

    def _keep_best_finished(self, top_tokens: torch.Tensor, top_logprobs: torch.Tensor, top_scores: torch.Tensor,
                            ends: torch.Tensor, step: int, rules: _BeamRules) -> None:
        """HF ``_update_finished_beams``: merge the candidates that just ended into the best ``beams``."""
        just_finished = ends & rules.top_beam_mask[None, :]
        scores = top_scores / ((step + 1) ** rules.length_penalty)
        full = torch.all(self.finished_flags, dim=-1, keepdim=True) & (rules.early_stopping is True)
        scores += full.to(torch.float32) * NEG_LARGE
        scores += (~self.improvable).to(torch.float32) * NEG_LARGE
        scores += (~just_finished) * NEG_LARGE
        merged_scores = torch.cat((self.finished_scores, scores), dim=1)
        best = torch.topk(merged_scores, k=rules.beams)[1]
        self.finished_tokens = _gather_beams(torch.cat((self.finished_tokens, top_tokens), dim=1), best)
        self.finished_logprobs = _gather_beams(torch.cat((self.finished_logprobs, top_logprobs), dim=1), best)
        self.finished_scores = _gather_beams(merged_scores, best)
        self.finished_flags = _gather_beams(torch.cat((self.finished_flags, just_finished), dim=1), best)

    def _update_improvable(self, step: int, rules: _BeamRules) -> None:
        """HF ``_check_early_stop_heuristic`` at cur_len = step + 2 (prompt length 1)."""
        if rules.early_stopping == "never" and rules.length_penalty > 0.0:
            best_length = rules.max_new_tokens
        else:
            best_length = step + 1
        best_live = self.running_scores[:, :1] / (best_length ** rules.length_penalty)
        worst_finished = torch.where(self.finished_flags, torch.min(self.finished_scores, dim=1, keepdim=True)[0],
                                     NEG_LARGE)
        self.improvable = self.improvable & torch.any(best_live > worst_finished, dim=-1, keepdim=True)

    def done(self, rules: _BeamRules) -> torch.Tensor:
        """(lines,) bool: ``generate`` can no longer change this line's best finished hypothesis."""
        all_full = torch.all(self.finished_flags, dim=-1) & (rules.early_stopping is True)
        return ~self.improvable[:, 0] | all_full

    def select(self, lines: torch.Tensor) -> "_BeamState":
        return _BeamState(**{name: value[lines] for name, value in vars(self).items()})


def ink_width_step(model: VisionEncoderDecoderModel, keep_aspect: bool) -> int | None:
    """Columns by which a batch of keep-aspect line images may be narrowed for :func:`encode_lines`:
    the encoder's patch width; None where the input cannot be narrowed (stretched input, other encoders)."""
    config = model.config.encoder
    if not keep_aspect or config.model_type not in ("vit", "deit"):
        return None
    return _pair(config.patch_size)[1]


def encode_lines(encoder: torch.nn.Module, pixel_values: torch.Tensor,
                 line_widths: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ViT/DeiT encoder output for keep-aspect line images, each attending to its own ink only.

    Why: keep-aspect line images are left-aligned on white, so the columns right of a line carry
    nothing. The batch may come narrower than the model's input (cut right of its widest line, see
    ``LinePreprocessor.to_pixel_values``): the encoder then works in proportion to the ink, and the
    kept patches keep their own position embeddings. ``line_widths`` (pixels, one per line) mask each
    line's patches right of its own width out of attention, so a line reads the same whatever batch it
    is in; the decoder must then attend to the same tokens, which the second value gives (bool, lines x
    tokens; None without widths). Equal to the encoder's own forward pass with those patches masked;
    without widths, at full width, it is the encoder's own forward pass.
    """
    config = encoder.config
    height, width = _pair(config.image_size)
    if line_widths is None and pixel_values.shape[-2:] == (height, width):
        return encoder(pixel_values=pixel_values).last_hidden_state, None
    patch_height, patch_width = _pair(config.patch_size)
    if pixel_values.shape[-2] != height or pixel_values.shape[-1] % patch_width or pixel_values.shape[-1] > width:
        raise ValueError(f"line images of {tuple(pixel_values.shape[-2:])} px do not fit a {height}x{width} encoder "
                         f"cut at multiples of {patch_width} px")
    embeddings = encoder.embeddings
    rows, columns, kept = height // patch_height, width // patch_width, pixel_values.shape[-1] // patch_width
    patches = embeddings.patch_embeddings.projection(pixel_values.to(embeddings.position_embeddings.dtype))
    patches = patches.flatten(2).transpose(1, 2)
    specials = [embeddings.cls_token] + ([embeddings.distillation_token] if hasattr(embeddings, "distillation_token") else [])
    positions = embeddings.position_embeddings
    grid = positions[:, len(specials):].reshape(1, rows, columns, -1)[:, :, :kept].reshape(1, rows * kept, -1)
    tokens = torch.cat([token.expand(len(pixel_values), -1, -1) for token in specials] + [patches], dim=1)
    hidden = embeddings.dropout(tokens + torch.cat([positions[:, :len(specials)], grid], dim=1))
    keep = mask = None
    if line_widths is not None:
        own_columns = -(-torch.as_tensor(line_widths, device=hidden.device).clamp(min=1) // patch_width)
        keep = torch.arange(kept, device=hidden.device).lt(own_columns[:, None]).repeat(1, rows)
        keep = torch.cat([keep.new_ones(len(keep), len(specials)), keep], dim=1)
        mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=keep)
    for layer in encoder.layers:
        hidden = layer(hidden, mask)
    return encoder.layernorm(hidden), keep


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor (lines, beams, ...) -> the beams named by indices (lines, k), as HF ``_gather_beams``."""
    while indices.ndim < tensor.ndim:
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Eager attention as TrOCRAttention computes it (query already scaled, additive mask); softmax in fp32."""
    weights = torch.matmul(query, keys.transpose(-1, -2))
    if bias is not None:
        weights = weights + bias
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(weights, values)


def _layer_weights(layer: torch.nn.Module) -> _LayerWeights:
    self_attn, cross_attn = layer.self_attn, layer.encoder_attn
    return _LayerWeights(
        self_qkv=_fused(self_attn.q_proj, self_attn.k_proj, self_attn.v_proj),
        self_out=(self_attn.out_proj.weight, self_attn.out_proj.bias),
        self_norm=_norm(layer.self_attn_layer_norm),
        cross_q=(cross_attn.q_proj.weight, cross_attn.q_proj.bias),
        cross_kv=_fused(cross_attn.k_proj, cross_attn.v_proj),
        cross_out=(cross_attn.out_proj.weight, cross_attn.out_proj.bias),
        cross_norm=_norm(layer.encoder_attn_layer_norm),
        fc1=(layer.fc1.weight, layer.fc1.bias),
        fc2=(layer.fc2.weight, layer.fc2.bias),
        final_norm=_norm(layer.final_layer_norm),
        activation=layer.activation_fn,
    )


def _fused(*projections: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Several linear layers on the same input as one (weights stacked along the output dimension)."""
    if any(projection.bias is None for projection in projections):
        raise ModelLoadError("TrOCR attention projections without bias are not supported by the fast engine")
    return (torch.cat([projection.weight for projection in projections]),
            torch.cat([projection.bias for projection in projections]))


def _norm(layer_norm: torch.nn.LayerNorm) -> _Norm:
    return _Norm(layer_norm.weight, layer_norm.bias, layer_norm.eps)


def _required_id(generation: dict[str, Any], name: str) -> int | list[int]:
    if generation.get(name) is None:
        raise ModelLoadError(f"generation config has no {name}; the fast engine needs it")
    return generation[name]


def check_decoder_type(model_type: str | None) -> None:
    """The engine repeats ``TrOCRDecoder``'s arithmetic: a VisionEncoderDecoder with another decoder (BERT, GPT-2,
    RoBERTa) is read by ``generate`` alone."""
    if model_type != "trocr":
        raise ModelLoadError(f"the model's decoder is a {model_type!r} one, not a TrOCR decoder, which the fast decoding "
                             f"engine reads only; use recognize.engine=hf (eval: --engine hf) for this model")


def check_generation_settings(name_or_path: str) -> None:
    """Refuse, from the checkpoint's configuration files alone (no weights loaded), generation settings this
    engine does not implement, and a decoder it does not read: the job's driver checks them at start-up, so a job
    fails before Ray reads a page, with one clear error, instead of in every recognizer actor it starts."""
    source = resolve_checkpoint(name_or_path)
    config = checkpoint_config(name_or_path, source)
    check_decoder_type(getattr(config.decoder, "model_type", None))
    try:
        generation = GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json: the model's own config holds its generation settings
        generation = GenerationConfig.from_model_config(config)
    _effective_generation_settings(generation)


def checkpoint_config(name_or_path: str, source: str) -> PretrainedConfig:
    """The checkpoint's configuration (``source``: :func:`operators.checkpoint.resolve_checkpoint`'s), read without
    its weights, with the decoder part a VisionEncoderDecoder has."""
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the configuration of TrOCR model {name_or_path!r}: {exc}") from exc
    if getattr(config, "decoder", None) is None:
        raise ModelLoadError(f"model {name_or_path!r} is no VisionEncoderDecoder: its configuration "
                             f"({config.model_type}) has no decoder")
    return config


def _effective_generation_settings(generation: GenerationConfig) -> dict[str, Any]:
    """The settings ``generate`` runs with: the model's own, unset ones filled with transformers' defaults
    (as ``GenerationMixin._prepare_generation_config`` does). Refuses settings that would make
    ``generate`` add logits processors this engine does not implement."""
    defaults = GenerationConfig._get_default_generation_params()
    settings = {**defaults, **{name: value for name, value in generation.to_dict().items() if value is not None}}
    changed = [name for name in UNSUPPORTED_GENERATION_SETTINGS if settings.get(name) != defaults.get(name)]
    if changed:
        raise ModelLoadError(f"generation config sets {', '.join(changed)}, which the fast decoding engine does not "
                             f"implement; use recognize.engine=hf for this model")
    return settings
