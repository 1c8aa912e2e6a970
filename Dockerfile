# The image every AeroLLMs Ray node runs: ray_cluster.yaml's docker.image and the KubeRay pods
# that `aero cluster k8s` writes. Ray's own GPU image (CUDA) with this project and its GPU
# extra (vLLM, flash-attn) installed; CPU nodes run it too.
#   docker build -t aerollms:0.1.0 .   then push it where the nodes can pull it
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /home/ray/aerollms
COPY --chown=ray:users . .
RUN DS_BUILD_OPS=0 pip install --no-cache-dir -e '.[gpu]'
