# One image for the gateway, the worker and the sink (see docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY callstream ./callstream
COPY gateway ./gateway
COPY streams ./streams
COPY warehouse ./warehouse
RUN pip install --no-cache-dir .
ENV CALLSTREAM_KAFKA_BOOTSTRAP=kafka:9092
ENTRYPOINT ["callstream"]
