"""A seeded, realistic prompt mix for ``inference-cache demo`` (pure: no I/O).

Owner: the demo (``inference_cache.demo`` drives it). Three traffic shapes that share
prefixes the way production traffic does:

* long shared system prompts (a few personas, each used by many conversations);
* multi-turn chats: every follow-up re-sends the whole conversation (system prompt, earlier
  turns, the assistant's replies) plus one new user message;
* RAG: a system prompt, then retrieved documents drawn from a small hot set (requests that
  retrieved the same first document share that prefix), then a question;
* templated requests: a few PromptTemplates (chat templates: a long literal system message,
  then a Mutable ``question``), each asked several questions. Requests name the template
  (``template.name``, ``template.variables``); the server renders them.

The workload is two phases: :attr:`Workload.first` (conversation openers and the first RAG
requests, placed without the index) and :attr:`Workload.follow_ups` (later turns and the
remaining RAG requests, interleaved across conversations so they compete for cache space).
Each :class:`Step` names a conversation; the driver keeps that conversation's history,
appends :attr:`Step.messages`, and after the engine answers appends the reply.
:attr:`Workload.templated` comes before both phases (:class:`TemplatedStep`, the questions
interleaved across templates, so each template's first request is its first anywhere).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

Message = tuple[str, str]
"""``(role, content)``."""

_VOCABULARY = (
    "cache replica prefix token block request latency throughput engine model prompt memory "
    "cluster gateway route policy tenant adapter index event stream batch queue schedule "
    "decode prefill context window budget service deploy rollout config metric alert incident "
    "customer invoice account order payment refund shipment warehouse product catalog price "
    "report summary contract clause section party liability term notice renewal agreement "
    "function module class method variable test build release branch commit review deadline "
    "the a of to and in for with on by from that this each every new old fast slow large small "
    "first last next previous current stable careful simple clear exact shared private public"
)
WORDS = tuple(_VOCABULARY.split())

PERSONAS = (
    "You are the support assistant of a cloud provider. Answer billing, account and "
    "deployment questions precisely, cite the relevant policy section, and never invent prices.",
    "You are a senior software engineer reviewing code. Explain problems step by step, propose "
    "minimal patches, and mention the tests that would catch each regression.",
    "You are a contracts analyst. Summarise clauses faithfully, flag obligations and deadlines, "
    "and quote the exact wording when a term is ambiguous.",
)
TEMPLATE_PERSONAS = (
    "You are the on-call assistant of a storage cluster. Follow the runbook below to the letter.",
    "You are the release manager of a mobile app. Apply the release checklist below.",
    "You are a payroll assistant. Answer only from the payroll rules below.",
    "You are a travel desk agent. Book and change trips following the policy below.",
)
RAG_SYSTEM = (
    "You answer questions using only the documents provided below. If the documents do not "
    "contain the answer, say so. Quote document titles when you use them."
)


@dataclass(frozen=True)
class Step:
    """One request: append ``messages`` to conversation ``conversation`` and send it."""

    label: str
    conversation: str
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class TemplatedStep:
    """One request naming the PromptTemplate ``template`` with this ``question``."""

    label: str
    template: str
    question: str
    first: bool
    """The template's first request."""


@dataclass(frozen=True)
class Workload:
    first: tuple[Step, ...]
    follow_ups: tuple[Step, ...]
    templates: tuple[tuple[str, dict[str, Any]], ...] = ()
    """``(name, PromptTemplate spec)`` of the templated requests."""
    templated: tuple[TemplatedStep, ...] = ()


@dataclass(frozen=True)
class WorkloadSettings:
    seed: int = 0
    conversations: int = 12
    turns: int = 4
    """Turns per conversation (the first is in phase 1)."""
    rag_requests: int = 12
    documents: int = 4
    docs_per_request: int = 2
    system_words: int = 160
    turn_words: int = 30
    document_words: int = 140
    templates: int = 2
    template_requests: int = 3
    """Questions asked of each template."""


def _sentences(rng: random.Random, words: int) -> str:
    out: list[str] = []
    while words > 0:
        n = min(words, rng.randint(6, 14))
        sentence = " ".join(rng.choice(WORDS) for _ in range(n))
        out.append(sentence[0].upper() + sentence[1:] + ".")
        words -= n
    return " ".join(out)


def template_spec(persona: str, rules: str) -> dict[str, Any]:
    """A chat PromptTemplate: the long system message is literal, the question Mutable."""
    return {
        "messages": [
            {"role": "system", "body": f"{persona}\n\n{rules}"},
            {"role": "user", "body": "{{.question}}"},
        ],
        "slots": [{"name": "question", "type": "Mutable", "required": True, "maxLength": 2000}],
    }


def _templated(
    rng: random.Random, s: WorkloadSettings
) -> tuple[list[tuple[str, dict[str, Any]]], list[TemplatedStep]]:
    specs = [
        (
            f"desk-{i + 1}",
            template_spec(TEMPLATE_PERSONAS[i % len(TEMPLATE_PERSONAS)], _sentences(rng, s.system_words)),
        )
        for i in range(s.templates)
    ]
    steps = [
        TemplatedStep(f"{name} q{q + 1}", name, _sentences(rng, s.turn_words // 2) + "?", q == 0)
        for q in range(s.template_requests)
        for name, _spec in specs
    ]
    return specs, steps


def generate(settings: WorkloadSettings) -> Workload:
    rng = random.Random(settings.seed)
    s = settings
    # The templates come from their own generator: adding them leaves the rest unchanged.
    specs, templated = _templated(random.Random(f"templates-{settings.seed}"), s)
    systems = [f"{persona}\n\nOperating notes:\n{_sentences(rng, s.system_words)}" for persona in PERSONAS]
    rag_system = f"{RAG_SYSTEM}\n\n{_sentences(rng, s.system_words // 2)}"
    documents = [f"# Document {i + 1}\n{_sentences(rng, s.document_words)}" for i in range(s.documents)]

    chats: list[list[Step]] = []
    for c in range(s.conversations):
        name = f"chat-{c + 1}"
        opener: tuple[Message, ...] = (
            ("system", systems[c % len(systems)]),
            ("user", _sentences(rng, s.turn_words) + "?"),
        )
        steps = [Step(f"{name} t1", name, opener)]
        steps += [
            Step(f"{name} t{t + 1}", name, (("user", _sentences(rng, s.turn_words) + "?"),))
            for t in range(1, s.turns)
        ]
        chats.append(steps)

    rags: list[Step] = []
    for r in range(s.rag_requests):
        picked = rng.sample(range(s.documents), k=min(s.docs_per_request, s.documents))
        context = "\n\n".join(documents[i] for i in picked)
        question = _sentences(rng, s.turn_words // 2) + "?"
        docs = "+".join(str(i + 1) for i in picked)
        name = f"rag-{r + 1}"
        rags.append(
            Step(f"{name} d{docs}", name, (("system", rag_system), ("user", f"{context}\n\nQ: {question}")))
        )

    first_rag, later_rag = rags[: len(rags) // 2], rags[len(rags) // 2 :]
    first = [steps[0] for steps in chats] + first_rag
    follow_ups: list[Step] = []
    for t in range(1, s.turns):
        follow_ups += [steps[t] for steps in chats]
        # a slice of RAG traffic between every round of chat turns
        share = -(-len(later_rag) // max(s.turns - 1, 1))
        follow_ups += later_rag[(t - 1) * share : t * share]
    if s.turns < 2:
        follow_ups += later_rag
    return Workload(tuple(first), tuple(follow_ups), tuple(specs), tuple(templated))
