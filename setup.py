"""Maps the process folders onto the `reddwarf.*` import names.

The top-level layout (server/, hostd/, agent/, clients/) is one folder per process; installed they are
`reddwarf.server`, `reddwarf.hostd`, ... and never bare `server`/`agent` packages. Subpackages are
discovered, so adding one needs no edit here.
"""
import os

from setuptools import find_packages, setup

ROOTS = {
    "reddwarf.common": "common",
    "reddwarf.server": "server",
    "reddwarf.hostd": "hostd",
    "reddwarf.agent": "agent",
    "reddwarf.client": "clients",
    "reddwarf.v1": "gen/reddwarf/v1",
}

packages: list[str] = []
package_dir: dict[str, str] = {}
for name, folder in ROOTS.items():
    if not os.path.isdir(folder):
        continue
    packages.append(name)
    package_dir[name] = folder
    for sub in find_packages(folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = os.path.join(folder, *sub.split("."))

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"reddwarf.server": ["migrations/*.ini", "migrations/*.mako"], "reddwarf.hostd": ["templates/*"]},
    include_package_data=True,
)
