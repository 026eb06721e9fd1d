#!/usr/bin/env bash
# Build the operator and worker images with docker or buildah, whichever is present:
#   docker/build-images.sh [operator|worker]...        (both when none is named)
# Environment:
#   REGISTRY  image name prefix (ghcr.io/selfaugment, the chart's default); push with
#             `docker push` / `buildah push` after building
#   TAG       image tag (the project version, the chart's appVersion)
#   BUILDER   docker or buildah, to choose when both are present
#   BUILD_ARGS extra arguments for the builder (e.g. --build-arg BASE=... --build-arg
#             TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
REGISTRY=${REGISTRY:-ghcr.io/selfaugment}
TAG=${TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)}
BUILDER=${BUILDER:-$(command -v docker >/dev/null && docker info >/dev/null 2>&1 && echo docker \
  || (command -v buildah >/dev/null && echo buildah) || echo none)}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(operator worker)

for target in "${targets[@]}"; do
  case "$target" in
    operator) dockerfile=docker/Dockerfile ;;
    worker) dockerfile=docker/Dockerfile.worker ;;
    *) echo "build-images.sh: unknown image '$target' (operator or worker)" >&2; exit 2 ;;
  esac
  image="$REGISTRY/$target:$TAG"
  echo "building $image with $BUILDER from $dockerfile"
  case "$BUILDER" in
    # shellcheck disable=SC2086  # BUILD_ARGS is a list of arguments
    docker) docker build -f "$dockerfile" -t "$image" ${BUILD_ARGS:-} . ;;
    # chroot isolation needs no OCI runtime (works in unprivileged CI containers too)
    buildah) buildah bud --isolation "${BUILDAH_ISOLATION:-chroot}" --layers -f "$dockerfile" \
      -t "$image" ${BUILD_ARGS:-} . ;;
    *) echo "build-images.sh: neither docker nor buildah is available" >&2; exit 1 ;;
  esac
done
