"""The ``coach`` command. ``coach serve`` and ``coach run``, the two sides of a deployment, run
from ``coach_fx.deploy.cli`` without loading the compile side (the optimizer, networkx,
torchvision's models); ``coach plan``, ``coach demo``, ``coach profile`` and the help from
``coach_fx.compile_cli``.

    coach plan --model torchvision:resnet18 --uplink-mbps 10 --slowdown 8
    coach plan --model resnet50 --strategy all
    coach demo
    coach profile --model resnet18 --out pi.json     # on the device: its own node times
    coach plan --model mypkg.models:net --weights net.safetensors --input-shape 3,64,64 \\
               --end-profile pi.json
    coach serve plan_dir --port 29517            # until SIGTERM/Ctrl-C; --sessions N: N ends
    coach serve plan_dir --host 0.0.0.0 --tls-cert cloud.pem --tls-key cloud.key
    coach run plan_dir --host cloud.example --tls-ca cloud.pem --synthetic 100

The shared token comes from ``--token-file`` or ``$COACH_TOKEN``, never the command line.
"""

from __future__ import annotations

import sys

from coach_fx.deploy.cli import DEPLOY_COMMANDS


def main(argv: list[str] | None = None) -> int:
    """Run ``coach ARGV`` (default: the process's arguments); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in DEPLOY_COMMANDS:
        from coach_fx.deploy.cli import main as deploy_main
        return deploy_main(argv)
    from coach_fx.compile_cli import main as compile_main
    return compile_main(argv)


if __name__ == "__main__":
    sys.exit(main())
