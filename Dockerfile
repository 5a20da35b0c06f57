# evalkit on a CUDA PyTorch runtime: docker build -t evalkit . && docker run --gpus all -v $PWD:/work evalkit report configs/demo.yaml
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
WORKDIR /opt/evalkit
COPY pyproject.toml README.md ./
COPY evalkit ./evalkit
COPY reports/templates ./reports/templates
# torch comes from the base image; pip keeps it because it satisfies the range in pyproject
RUN pip install --no-cache-dir . && rm -rf /root/.cache
WORKDIR /work
ENV MPLBACKEND=Agg
ENTRYPOINT ["evalkit"]
CMD ["--help"]
