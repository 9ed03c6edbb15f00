"""Safe YAML loading that remembers on which line every key and list item stands.

Error messages must say `FILE:LINE: message`; pydantic reports a location path such as
("bands", 2, "upto"), which `LineMap.line_for` turns back into a line of the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from guardrail.errors import PolicyError

Path_ = tuple[Any, ...]
MAX_NODES = 20_000


@dataclass
class LineMap:
    """Location path -> (file, line), 1-based lines."""

    entries: dict[Path_, tuple[str, int]] = field(default_factory=dict)
    default: tuple[str, int] = ("<unknown>", 1)

    def line_for(self, path: Path_) -> tuple[str, int]:
        path = tuple(path)
        while path:
            if path in self.entries:
                return self.entries[path]
            path = path[:-1]
        return self.entries.get((), self.default)

    def merged_over(self, base: "LineMap") -> "LineMap":
        """Lines of a document merged over `base` (this document's lines win)."""
        return LineMap({**base.entries, **self.entries}, self.default)


def load_yaml(text: str, filename: str) -> tuple[Any, LineMap]:
    """Parse one YAML document with the safe loader. Raises PolicyError with file and line."""
    try:
        # The reader checks the characters when it is built: a control character raises here.
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, max(0, exc.position)) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise PolicyError([(filename, line, f"invalid YAML: {exc.reason} (character #x{code:04x})")]) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None, LineMap({(): (filename, 1)}, (filename, 1))
        lines = LineMap({(): (filename, node.start_mark.line + 1)}, (filename, 1))
        problems: list[tuple[str, int, str]] = []
        budget = [MAX_NODES]
        _walk(node, (), filename, lines, problems, budget)
        if problems:
            raise PolicyError(problems)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        message = " ".join(p for p in (exc.context, exc.problem) if p) or str(exc)
        raise PolicyError([(filename, line, f"invalid YAML: {message}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([(filename, 1, f"invalid YAML: {exc}")]) from None
    except (ValueError, TypeError, RecursionError) as exc:
        # The safe constructor can still fail on odd scalars (e.g. an out-of-range date).
        raise PolicyError([(filename, 1, f"invalid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    return data, lines


def _walk(node: yaml.Node, path: Path_, filename: str, lines: LineMap, problems: list, budget: list[int]) -> None:
    # Aliases are walked again each time they are used, so this also bounds "billion laughs"
    # documents, whose expansion would otherwise blow up validation and hashing.
    budget[0] -= 1
    if budget[0] < 0:
        if budget[0] == -1:
            problems.append((filename, node.start_mark.line + 1, f"document too large (over {MAX_NODES} nodes after expanding aliases)"))
        return
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append((filename, key_node.start_mark.line + 1, "mapping keys must be plain scalars"))
                continue
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen and key != "<<":
                problems.append((filename, line, f"duplicate key {key!r} (first on line {seen[key]})"))
            seen[key] = line
            lines.entries[path + (key,)] = (filename, line)
            _walk(value_node, path + (key,), filename, lines, problems, budget)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.entries[path + (index,)] = (filename, item.start_mark.line + 1)
            _walk(item, path + (index,), filename, lines, problems, budget)
