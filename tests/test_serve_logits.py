"""serve/logits.py: a batch whose rows each ask their own parameters equals each row processed alone
by a plain per-row reference of the definitions (OpenAI's penalties, vLLM's repetition penalty,
top_k, min_p, top_p), and logprobs equal log_softmax."""

from __future__ import annotations

import torch

from adapterhub.serve.logits import RowView, logprobs_of, process, truncate
from adapterhub.serve.sampling import Sampling

VOCAB = 50
EOS = {1}


def _reference(logits: torch.Tensor, row: RowView) -> torch.Tensor:
    """One row, stage by stage, with Python loops over its tokens."""
    out, s = logits.clone(), row.sampling
    if len(row.output) < s.min_tokens:
        for token in (set() if s.ignore_eos else EOS) | set(s.stop_token_ids):
            out[token] = float("-inf")
    for token, bias in s.logit_bias:
        out[token] += bias
    seen = set(row.prompt) | set(row.output)
    for token in seen:
        if s.repetition_penalty != 1:
            out[token] = out[token] / s.repetition_penalty if out[token] > 0 else out[token] * s.repetition_penalty
    for token in set(row.output):
        out[token] -= s.frequency_penalty * list(row.output).count(token) + s.presence_penalty
    return out


def _rows() -> list[RowView]:
    return [
        RowView(Sampling(8), [3, 4], []),
        RowView(Sampling(8, frequency_penalty=1.5, presence_penalty=-0.5), [5], [7, 7, 9]),
        RowView(Sampling(8, repetition_penalty=1.7), [2, 3, 3], [11, 12]),
        RowView(Sampling(8, logit_bias=((4, 100.0), (6, -20.0))), [1], [4]),
        RowView(Sampling(8, min_tokens=3, stop_token_ids=(9,)), [2], [5]),
        RowView(Sampling(8, min_tokens=3, ignore_eos=True, stop_token_ids=(9,), repetition_penalty=0.5), [8], []),
    ]


def test_process_equals_each_row_alone():
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB) * 3
    rows = _rows()
    batch = process(logits, rows, EOS)
    for i, row in enumerate(rows):
        assert torch.allclose(batch[i], _reference(logits[i], row), atol=1e-6), i
    assert torch.equal(process(logits[:1], rows[:1], EOS), logits[:1])  # nothing asked: the same logits
    mask = torch.zeros(2, (VOCAB + 31) // 32, dtype=torch.int32)
    mask[:, 0] = 0b1010  # tokens 1 and 3 only
    masked = process(logits, rows, EOS, [0, 3], mask)
    assert torch.isinf(masked[0]).sum() == VOCAB - 2 and masked[0, 3] == logits[0, 3]
    assert torch.allclose(masked[1], batch[1])  # unmasked rows as before


def _truncate_reference(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    probs = torch.softmax(logits / s.temperature, -1)
    order = probs.argsort(descending=True).tolist()
    kept, mass = [], 0.0
    for rank, token in enumerate(order):
        p = probs[token].item()
        if rank > 0 and ((s.top_k > 0 and rank >= s.top_k) or p < s.min_p * probs[order[0]].item() or mass >= s.top_p):
            continue
        kept.append(token)
        mass += p
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out


def test_truncate_equals_each_row_alone():
    torch.manual_seed(1)
    logits = torch.randn(5, VOCAB) * 2
    samplings = [
        Sampling(8),
        Sampling(8, temperature=0.5, top_k=3),
        Sampling(8, temperature=1.3, min_p=0.2),
        Sampling(8, top_p=0.6),
        Sampling(8, top_k=10, min_p=0.05, top_p=0.9),
    ]
    probs = truncate(
        logits,
        torch.tensor([s.temperature for s in samplings]),
        torch.tensor([s.top_k for s in samplings]),
        torch.tensor([s.min_p for s in samplings]),
        torch.tensor([s.top_p for s in samplings]),
    )
    for i, s in enumerate(samplings):
        assert torch.allclose(probs[i], _truncate_reference(logits[i], s), atol=1e-6), i
    assert (probs[1] > 0).sum() == 3


def test_logprobs_of():
    torch.manual_seed(2)
    logits = torch.randn(3, VOCAB)
    entries = logprobs_of(logits, torch.tensor([4, 0, 7]), [0, 2, 5])
    logp = torch.log_softmax(logits, -1)
    for i, (entry, token, k) in enumerate(zip(entries, [4, 0, 7], [0, 2, 5])):
        assert entry.token == token and abs(entry.logprob - logp[i, token].item()) < 1e-6
        assert [t for t, _ in entry.top] == logp[i].topk(k).indices.tolist() if k else entry.top == ()
