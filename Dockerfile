# trainguard as a container: `docker run --rm -v "$PWD:/data:ro" trainguard scan /data`
# Non-root, no compiler in the final image, trainguard as the entrypoint.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --prefix=/install ".[all]"

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --create-home --uid 10001 trainguard
USER trainguard
WORKDIR /data
ENTRYPOINT ["trainguard"]
CMD ["--help"]
