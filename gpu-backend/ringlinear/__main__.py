"""ringlinear command line: `python -m ringlinear <command> --help`."""

from __future__ import annotations

import importlib
import sys

# command -> module with a main(argv); imported lazily so e.g. `serve` never pays for the tools and vice versa.
COMMANDS = {
    "make-tiny": ("ringlinear.tools.make_tiny", "write a deterministic tiny checkpoint"),
    "golden": ("ringlinear.tools.golden", "write or check the golden vectors"),
    "params": ("ringlinear.tools.params", "parameter counts of a config"),
    "serve": ("ringlinear.server.cli", "run the OpenAI-compatible pod server"),
    "train": ("ringlinear.train.cli", "train a small model"),
    "export-onnx": ("ringlinear.export.onnx", "export a checkpoint to ONNX for onnxruntime-web"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m ringlinear <command> [options]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:12s} {help_}")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module, _ = COMMANDS[argv[0]]
    importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    main()
