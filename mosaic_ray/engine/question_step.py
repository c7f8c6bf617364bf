"""QuestionStepper: a question's start and its steps (prepare tensors -> one forward -> sample).

    start(state, request)  validate, tokenize, reserve the question's working set in the device pool
    step(runs)             one forward for every run (prefill, decode or closing), then each run takes
                           its chosen token; greedy rows come back in one device-to-host copy

A step of decoding and closing runs only feeds one token per run, through the decode CUDA graph
(a closing run its next closing token: a Q/A's closing costs no eager forward); a step with a
prefill is eager and feeds each closing run all its remaining tokens. A run whose closing text is
all fed is left in phase "closing" (`QuestionRun.closed`) with its own tokens in its working set:
the engine commits it to the stream (`StreamEngine._commit_run`).
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from mosaic_ray.cache.device_pool import DeviceKVPool, DevicePoolExhaustedError
from mosaic_ray.cache.working_set import WorkingSet
from mosaic_ray.config import EngineConfig
from mosaic_ray.engine.interface import AskRequest, InvalidInputError, OverloadedError, StreamBusyError
from mosaic_ray.engine.model_runner import ModelRunner
from mosaic_ray.engine.question import QuestionRun
from mosaic_ray.engine.sampling import choose_tokens
from mosaic_ray.engine.stream_state import StreamState
from mosaic_ray.model.adapter import ModelAdapter
from mosaic_ray.model.attention import StreamStep
from mosaic_ray.transfer import to_device


class QuestionStepper:
    def __init__(self, adapter: ModelAdapter, runner: ModelRunner, kv_pool: DeviceKVPool, config: EngineConfig) -> None:
        self.adapter, self.runner, self.kv_pool, self.config = adapter, runner, kv_pool, config

    def start(self, state: StreamState, request: AskRequest) -> QuestionRun:
        if state.busy:
            raise StreamBusyError(f"stream {state.stream_id!r} is already answering a question")
        prompt, closing = self.adapter.question_text(request.question)
        tok = self.adapter.tokenizer
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        if len(prompt_ids) + request.max_tokens > self.config.max_question_tokens:
            raise InvalidInputError(
                f"question of {len(prompt_ids)} tokens + max_tokens {request.max_tokens} exceeds the limit "
                f"of {self.config.max_question_tokens} tokens"
            )
        closing_ids = tok.encode(closing, add_special_tokens=False)
        cache = state.cache
        # the past a question attends: in place, `full`'s whole past or the tokens staged for
        # offload; retrieved, at most min(budget, offloaded) tokens per (layer, KV head) into
        # reserved slots
        past = cache.past_slots(request.since, request.until)
        retrieved = cache.retrieved_tokens()
        own = len(prompt_ids) + request.max_tokens + len(closing_ids) + 1
        try:
            work = WorkingSet.reserve(self.kv_pool, retrieved, own)
        except DevicePoolExhaustedError as exc:
            raise OverloadedError(str(exc)) from exc
        attended = [cache.slots] + ([past] if past is not None else []) + [work.retrieved]
        step = StreamStep(cache, 0, retrieve=True, since=request.since, until=request.until, work=work)
        gen = torch.Generator().manual_seed(request.seed if request.seed is not None else self.config.seed)
        run = QuestionRun(state, request, prompt_ids, closing_ids, step,
                          set(self.adapter.eos_token_ids), pos_cursor=state.next_pos, generator=gen,
                          context=torch.cat(attended), pos_base=state.next_pos, pos_reserved=own, clock=state.clock)
        # the run's positions are its own; frames ingested during the answer come after them
        state.next_pos += own
        state.busy = state.awaiting_prefill = True
        cache.hold()
        return run

    def step(self, runs: list[QuestionRun]) -> list[str]:
        """One forward for every run; returns each run's new text ("" for closing runs)."""
        steps = [r.step for r in runs]
        kv_lists = [torch.cat([r.context, r.step.work.own[: r.step.work.used]]) for r in runs]
        if all(r.phase in ("decode", "closing") for r in runs):  # one token each: the CUDA-graph path
            P = self.adapter.layout.pos_dims
            positions = to_device([r.pos_cursor for r in runs], self.adapter.device, torch.int64)[None].expand(P, -1)
            spans, sizes = [1] * len(runs), [1] * len(runs)
            new_slots = [r.step.work.next_slots(1) for r in runs]
            for r in runs:
                r.step.new_tokens, r.step.retrieve = 1, False
            with record_function("question.decode"):
                logits = self.runner.decode([int(r.next_ids()[0]) for r in runs], positions, steps, kv_lists, new_slots)
            pending = [positions[:, j : j + 1] for j in range(len(runs))]
        else:  # text tokens only: prompts, and the other runs' decode or closing tokens
            ids = [r.next_ids() for r in runs]
            for run, x in zip(runs, ids):
                if run.pos_cursor + len(x) > run.pos_base + run.pos_reserved:
                    raise RuntimeError(f"question of stream {run.state.stream_id!r} outgrew its reserved positions")
                run.step.new_tokens = len(x)
                run.step.retrieve = run.phase == "prefill"
            # a text token's positions count up in every position dim (`ModelAdapter.ids_chunk`)
            P = self.adapter.layout.pos_dims
            host = [p for r, x in zip(runs, ids) for p in range(r.pos_cursor, r.pos_cursor + len(x))]
            positions = to_device(host, self.adapter.device, torch.int64)[None].expand(P, -1)
            new_slots = [r.step.work.next_slots(len(x)) for r, x in zip(runs, ids)]
            with record_function("question.prefill"):
                logits = self.runner.prefill(ids, positions, steps, kv_lists, new_slots)
            spans = sizes = [len(x) for x in ids]
            pending = list(positions.split(sizes, 1))
        live = [i for i, r in enumerate(runs) if r.phase != "closing"]
        tokens = dict(zip(live, choose_tokens(logits[live], [runs[i].request.temperature for i in live],
                                              [runs[i].request.top_p for i in live],
                                              [runs[i].generator for i in live]))) if live else {}
        deltas = []
        for row, run in enumerate(runs):
            run.step.work.advance(sizes[row])
            run.pending_pos.append(pending[row])
            run.pos_cursor += spans[row]
            if run.phase == "closing":
                run.closing_fed += sizes[row]  # text tokens: one per id fed
                deltas.append("")
                continue
            deltas.append(run.take_token(tokens[row], self.adapter.tokenizer))
        return deltas
