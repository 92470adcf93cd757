"""Generates reddwarf.v1 (messages, gRPC stubs, mypy stubs) from protos/reddwarf/v1/*.proto."""
import glob
import os
import sys

import grpc_tools
from grpc_tools import protoc


def main() -> int:
    protos = sorted(glob.glob("protos/reddwarf/v1/*.proto"))
    includes = [os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")]
    # google/rpc/status.proto ships inside googleapis-common-protos.
    import google.rpc  # noqa: F401  (from googleapis-common-protos)

    for path in sys.path:
        if os.path.exists(os.path.join(path, "google", "rpc", "status.proto")):
            includes.append(path)
            break
    args = ["protoc", "-Iprotos", *(f"-I{i}" for i in includes), "--python_out=gen", "--grpc_python_out=gen",
            "--mypy_out=gen", "--mypy_grpc_out=gen", *protos]
    # protoc finds its plugins (protoc-gen-mypy) on PATH: put the venv's bin first.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    rc = protoc.main(args)
    if rc != 0:
        return rc
    open("gen/reddwarf/v1/__init__.py", "w").write('"""Generated from protos/reddwarf/v1; never edit."""\n')
    link_tree()
    return 0


# The checkout's folders under their import names, so that mypy (`mypy_path = gen`), IDEs and reviewers
# resolve `reddwarf.server`, `reddwarf.v1`, ... from the checkout itself, not through the installed
# package's import hook. The same mapping as setup.py's.
FOLDERS = {"common": "common", "server": "server", "hostd": "hostd", "agent": "agent", "client": "clients"}


def link_tree() -> None:
    open("gen/reddwarf/__init__.py", "w").write('"""Red Dwarf: the checkout\'s folders under their import names."""\n')
    open("gen/reddwarf/py.typed", "w").close()
    for name, folder in FOLDERS.items():
        link = os.path.join("gen", "reddwarf", name)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..", "..", folder), link)


if __name__ == "__main__":
    sys.exit(main())
