"""Generate the README's spec reference from the JSON Schema (the one source of truth).

    python -m storyc.docs --write    # refresh README.md between the markers
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

BEGIN, END = "<!-- spec-reference:begin -->", "<!-- spec-reference:end -->"


def spec_reference() -> str:
    from .schema import resolve, schema

    sch = schema()
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    policy = {"never": " *Not hashed: an execution setting.*", "when-set": " *Hashed only when set.*"}

    def typ(s):
        if "enum" in s:
            return " \\| ".join(map(str, s["enum"]))
        if "const" in s:
            return str(s["const"])
        if "oneOf" in s:
            return "one of several forms"
        t = s.get("type", "")
        t = " or ".join(t) if isinstance(t, list) else t
        bits = [f"{k} {s[k]}" for k in ("minimum", "maximum", "exclusiveMinimum", "multipleOf") if k in s]
        return t + (f" ({', '.join(bits)})" if bits else "")

    def walk(props, prefix, required=()):
        for k, s in props.items():
            s = resolve(s)
            key = f"{prefix}{k}"
            default = "**required**" if k in required else (
                "`" + json.dumps(s["default"], ensure_ascii=False) + "`" if "default" in s and s["default"] != {} else "")
            meaning = s.get("description", "") + policy.get(s.get("x-hash"), "")
            rows.append(f"| `{key}` | {typ(s)} | {default} | {meaning} |")
            if "properties" in s:
                walk(s["properties"], key + ".", s.get("required", ()))
            elif isinstance(s.get("additionalProperties"), dict) and "properties" in resolve(s["additionalProperties"]):
                each = resolve(s["additionalProperties"])  # an id -> record map (characters)
                walk(each["properties"], key + ".<id>.", each.get("required", ()))
            elif s.get("type") == "array" and "properties" in resolve(s.get("items", {})):
                items = resolve(s["items"])
                if key != "datasets":  # `datasets[]` has the fields of `dataset`, listed once
                    walk(items["properties"], key + "[].", items.get("required", ()))

    walk(sch["properties"], "", sch.get("required", ()))
    return "\n".join([BEGIN, *rows, END])


def main() -> int:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text("utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + spec_reference() + text[end:]
    if "--write" in sys.argv:
        readme.write_text(new, "utf-8")
    else:
        sys.stdout.write(spec_reference() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
