"""A PromptTemplate spec shared by the picker and Envoy template tests: a Stable persona and
manual in the system message, a Mutable question. Importable from any test as
``template_samples`` (``pythonpath = ["tests"]``)."""

from typing import Any

CHAT_TEMPLATE: dict[str, Any] = {
    "messages": [
        {"role": "system", "body": "You are {{.persona}}.\n\n{{.manual}}"},
        {"role": "user", "body": "{{.question}}"},
    ],
    "slots": [
        {"name": "persona", "type": "Stable", "required": True},
        {"name": "manual", "type": "Stable", "required": True},
        {"name": "question", "type": "Mutable", "required": True},
    ],
    "normalization": "collapse",
}
