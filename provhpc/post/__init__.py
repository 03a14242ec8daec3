"""Reading and answering: the reader, tables, index, lineage graph, queries, named
questions, PROV/Parquet export, the HTML report, merge and MPI post-processing.

Imports ``provhpc.format`` only (it reads what the node side wrote).
"""

__all__: list[str] = []
