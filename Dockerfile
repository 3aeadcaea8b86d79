FROM python:3.11-slim

WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app ./app
COPY asyncjobs ./asyncjobs
COPY jobs ./jobs
COPY worker_settings.py ./
RUN pip install --no-cache-dir . && useradd --system --no-create-home asyncjobs

USER asyncjobs
ENV WEB_HOST=0.0.0.0 WEB_PORT=8000 PYTHONUNBUFFERED=1
EXPOSE 8000
CMD ["python", "-m", "app", "web"]
