"""Generic helpers every package of this project may use (atomic file writes, the BLAS start-up check); this
package imports nothing of the project's own."""
