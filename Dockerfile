# One image for every Outreach service; docker-compose.yml picks the command per container.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OUTREACH_DATA_DIR=/data \
    MALLOC_ARENA_MAX=2 \
    MALLOC_TRIM_THRESHOLD_=131072

WORKDIR /app
# Only what the package needs (keeps .venv, var/ and tests out of the image).
COPY pyproject.toml ./
COPY schemas ./schemas
COPY services ./services
COPY outreach ./outreach
RUN pip install . && mkdir -p /data

VOLUME ["/data"]
CMD ["python", "-m", "services.command_handler"]
