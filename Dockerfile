# lmcache-ext layered on the SageMaker LMI image (DJL Serving + vLLM).
# Build: docker build -t lmcache-ext-lmi .   (another LMI: --build-arg BASE_IMAGE=...)
# The base's torch, vLLM and CUDA are kept as they are: the package goes in with --no-deps, then
# only the small pure-Python packages it needs that the base may lack. Its vLLM plugin (entry
# point lmcache_ext) makes every LMCache route run lmcache-ext; the build checks it is there.
ARG BASE_IMAGE=763104351884.dkr.ecr.us-west-2.amazonaws.com/djl-inference:0.36.0-lmi27.0.0-cu130
FROM ${BASE_IMAGE}

# The interpreter that LMI runs vLLM with (the package must be importable by it).
ARG PYTHON=python3
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Fail the build, with the reason, when the base's vLLM is one our connector does not support
# (keep in step with lmcache_ext/adapters/vllm/compat.py SUPPORTED).
RUN vllm_version="$(${PYTHON} -c 'import vllm; print(vllm.__version__)')" \
    && case "${vllm_version}" in \
         0.23.*|0.32.*|0.33.*) echo "base image vLLM ${vllm_version}: supported by lmcache-ext" ;; \
         *) echo "ERROR: the base image's vLLM is ${vllm_version}; lmcache-ext supports" \
                 "vLLM 0.23.x, 0.32.x and 0.33.x: choose another BASE_IMAGE" >&2; exit 1 ;; \
       esac

# PIP_BREAK_SYSTEM_PACKAGES: a base whose Python is the distribution's (PEP 668) still takes the
# package; older pips ignore it.
ENV PIP_BREAK_SYSTEM_PACKAGES=1
COPY pyproject.toml README.md /opt/lmcache-ext/src/
COPY lmcache_ext /opt/lmcache-ext/src/lmcache_ext
RUN ${PYTHON} -m pip install --no-cache-dir --no-deps /opt/lmcache-ext/src \
    && ${PYTHON} -m pip install --no-cache-dir "pyyaml>=6.0" "xxhash>=3.4" \
         "prometheus-client>=0.20" "redis>=5.3" "hiredis>=3.0" \
    && ${PYTHON} -c "import lmcache_ext.container.entrypoint" \
    && ${PYTHON} -c "from importlib.metadata import entry_points as e; \
assert 'lmcache_ext' in e(group='vllm.general_plugins').names, 'vLLM plugin not registered'"

# The entrypoint and the example configs; not container/lmi_stand_in (the test base's own files).
COPY container/entrypoint.sh container/lmcache_config_cpu.yaml container/lmcache_config_nvme.yaml \
     /opt/lmcache-ext/container/
RUN chmod 0755 /opt/lmcache-ext/container/entrypoint.sh
# The LMI handler (LMI's vLLM service with session pins). DJL loads it by path where our
# entrypoint sets OPTION_ENTRYPOINT to it (lmcache_ext/container/lmi_sessions.py).
COPY handlers/ /opt/lmcache-ext/handlers/

# LMI_ENTRYPOINT: the stage our entrypoint execs after its checks (LMI's own entrypoint).
# LMI_HANDLER_FILE: the handler file above.
ENV LMI_ENTRYPOINT=/usr/local/bin/dockerd-entrypoint.sh \
    LMI_PYTHON=${PYTHON} \
    LMI_HANDLER_FILE=/opt/lmcache-ext/handlers/lmcache_ext_vllm.py

EXPOSE 8080
ENTRYPOINT ["/opt/lmcache-ext/container/entrypoint.sh"]
CMD ["serve"]
