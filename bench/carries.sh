#!/usr/bin/env bash
# The folders a device call carries (the device reaches no network; KINDS.md lists what its image already holds),
# made here for its Python 3.12 on x86_64. Each named folder is emptied first; all are in .gitignore.
#   bash bench/carries.sh whl whlmin fa4 ray vllm
# whl     25 MB  cudnn-frontend 1.28.0, flashinfer-python 0.6.13 and what our distributions need beside the image
#                (pydantic, tabulate, einops, nvidia-ml-py; setuptools 80.9.0 builds our pyproject files)
# whlmin 2.7 MB  the same without the backend libraries (native only)
# fa4     61 MB  flash-attn-4 4.0.0b15 with its CUTLASS DSL 4.4.2 (whose 74 MB libs wheel travels as its installed
#                files, xz-packed: bench/gpu_setup.sh unpacks any *.tar.xz); cannot share a call with flashinfer
# ray     28 MB  Ray 2.60.0 as its installed files, xz-packed (the wheel is 79 MB), without what `--executor ray`
#                never loads: the Java workers' jars, the dashboard's web client (the executor starts no dashboard)
#                and the AI libraries (data, train, tune, serve, rllib, llm); with jsonschema and its parts. The
#                image has Ray's other requirements (click, filelock, msgpack, protobuf, pyyaml, requests).
# vllm    53 MB  vLLM 0.26.0's bundle from ../shared/peers/vllm-0.26.0 (its README), split in two pieces, .vllm/c1 and
#                .vllm/c2, stashed by two calls (`bash .vllm/vllm_device_setup.sh`, carrying one piece and the script
#                each): beside the repository's tracked files (12 MB) the one 53 MB piece no longer fits a call
set -euo pipefail
cd "$(dirname "$0")/.."
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"
}
# A wheel as its installed files, less the paths (globs) after its name, xz-packed into its folder. unzip, not
# Python's zipfile: it keeps the executable bits (Ray's gcs_server and raylet are programs).
repack() {
    local folder=$1 wheel=$2 packed=$3
    shift 3
    local files prune
    files=$(mktemp -d)
    unzip -q "$wheel" -d "$files"
    for prune in "$@"; do
        rm -rf "$files"/$prune
    done
    tar cJf "$folder/$packed" -C "$files" .
    rm -rf "$files" "$wheel"
}
common="pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.8.0 typing-inspection==0.4.5 tabulate==0.10.0
        einops==0.8.2 apache-tvm-ffi==0.1.15.post2"
for carry in "$@"; do
    folder=.$carry
    rm -rf "$folder" && mkdir -p "$folder"
    case $carry in
        whl)
            get "$folder" $common nvidia-ml-py==13.615.71 nvidia-cudnn-frontend==1.28.0 flashinfer-python==0.6.13 \
                setuptools==80.9.0 ;;
        whlmin)
            get "$folder" $common nvidia-ml-py==13.615.71
            rm "$folder"/apache_tvm_ffi-*.whl ;;
        fa4)
            get "$folder" $common flash-attn-4==4.0.0b15 nvidia-cutlass-dsl==4.4.2 nvidia-cutlass-dsl-libs-base==4.4.2 \
                quack-kernels==0.4.1 torch-c-dlpack-ext==0.1.5
            repack "$folder" "$folder"/nvidia_cutlass_dsl_libs_base-4.4.2-*.whl libs_base_4.4.2.tar.xz '*.dist-info' ;;
        ray)
            get "$folder" ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
                rpds-py==2026.9.1
            repack "$folder" "$folder"/ray-2.60.0-*.whl ray_2.60.0.tar.xz ray/jars ray/dashboard/client/build \
                ray/data ray/train ray/tune ray/serve ray/rllib ray/llm ;;
        vllm)
            mkdir -p "$folder/c1" "$folder/c2"
            split -n 2 -d -a 2 ../shared/peers/vllm-0.26.0/vllm_site.tar.xz.part-00 "$folder/vllm_site.tar.xz.part-"
            mv "$folder/vllm_site.tar.xz.part-00" "$folder/c1/"
            mv "$folder/vllm_site.tar.xz.part-01" "$folder/c2/"
            # The setup script joins the pieces in name order and checks the whole bundle's sha256 as before.
            sed 's/^NPIECES=1$/NPIECES=2/' ../shared/peers/vllm-0.26.0/vllm_device_setup.sh \
                > "$folder/vllm_device_setup.sh"
            grep -q '^NPIECES=2$' "$folder/vllm_device_setup.sh" ;;
        *)
            echo "carries.sh: no carry named '$carry' (whl, whlmin, fa4, ray, vllm)" >&2
            exit 2 ;;
    esac
    du -sh "$folder"
done
