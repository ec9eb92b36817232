#!/usr/bin/env bash
# Downloads, here, the wheels tools/device_check.sh installs on the lent GPU machine, which
# reaches no package registry: what clca_jax imports beyond that machine's own packages (its
# Python 3.12 with jax, flax, optax, orbax, numpy, protobuf, absl, etils, pillow, tqdm), at the
# versions pyproject.toml pins. They land in .device_wheels/ (ignored by git; the device tool
# carries it: carry=[".device_wheels"]).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .device_wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --implementation cp -d .device_wheels \
  ml_collections==1.1.0 clu==0.0.12 grain==0.2.18 jmp==0.0.4 array_record==0.8.6 \
  tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 immutabledict==4.3.1 \
  simplejson==4.3.0 toml==0.10.2 dm-tree==0.1.10 tensorboardX==2.6.5 importlib_resources==7.1.0 \
  wrapt==2.5.2 humanize==4.17.0 portpicker==1.6.0
# Published as a source archive only; pure Python, so a wheel built here installs there.
python3 -m pip wheel -q --no-deps -w .device_wheels promise==2.3
du -sh .device_wheels
