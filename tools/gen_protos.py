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
    return 0


if __name__ == "__main__":
    sys.exit(main())
