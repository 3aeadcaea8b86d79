FROM python:3.11-slim

WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app ./app
COPY asyncjobs ./asyncjobs
COPY jobs ./jobs
COPY worker_settings.py ./
# the otel extra: traces stay off unless OTEL_* variables configure them (docs/tracing.md)
RUN pip install --no-cache-dir -U pip && pip install --no-cache-dir '.[otel]' && useradd --system --user-group --no-create-home asyncjobs
# The worker writes exports and images here and the web process serves them: docker-compose.yml
# mounts one named volume at /srv/var in both. A new named volume takes the ownership of the
# image's folder, so the folders are made and given to the runtime user before USER.
RUN mkdir -p /srv/var/exports /srv/var/images && chown -R asyncjobs:asyncjobs /srv/var

USER asyncjobs
ENV WEB_HOST=0.0.0.0 WEB_PORT=8000 PYTHONUNBUFFERED=1 \
    EXPORTS_DIR=/srv/var/exports IMAGES_DIR=/srv/var/images
EXPOSE 8000
CMD ["python", "-m", "app", "web"]
