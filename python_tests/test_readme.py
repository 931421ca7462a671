"""The README's Python examples run as written."""
import os
import re


def test_readme_examples_run():
    path = os.path.join(os.path.dirname(__file__), "..", "README.md")
    with open(path) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert blocks
    namespace = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)
    assert namespace["out"].shape[-1] == namespace["D"]
