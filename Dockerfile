# One image for the gateway, the worker and the sink (see docker-compose.yml). Configure it with
# CALLSTREAM_* variables; nothing here assumes a broker's address.
FROM python:3.11-slim

# The pinned dependencies first, in their own layer: a change to the code does not reinstall them.
WORKDIR /app
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock

COPY pyproject.toml README.md ./
COPY kernel ./kernel
COPY gateway ./gateway
COPY streams ./streams
COPY warehouse ./warehouse
COPY callstream ./callstream
RUN pip install --no-cache-dir --no-deps .

# Not root. uid 1000 is the first user of most hosts, so a bind-mounted ./data stays theirs;
# /data is where docker-compose.yml puts the volumes, the working folder is where a .env is read.
RUN useradd --uid 1000 --create-home callstream \
    && mkdir -p /data /home/callstream/work && chown callstream:callstream /data /home/callstream/work
USER callstream
WORKDIR /home/callstream/work
ENTRYPOINT ["callstream"]
CMD ["--help"]
