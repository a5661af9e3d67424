"""Only what pyproject.toml cannot say: install ``tying-bridges.pth`` into site-packages (see _tying_bridges.py), in
regular and editable installs alike."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "tying-bridges.pth"


class BuildPyWithPth(build_py):
    """build_py, plus the .pth file at the root of what gets installed (the wheel's root: site-packages)."""

    def run(self):
        super().run()
        # an editable build installs from the unpacked wheel (install_lib); a regular one packs build_lib
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(PTH, os.path.join(root, PTH))


setup(cmdclass={"build_py": BuildPyWithPth})
