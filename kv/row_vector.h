// File: RowVector, the per-row host metadata of a head's pages (positions, mask bytes,
// scores): a contiguous vector that can also drop its first elements in O(1) amortised.
// A ring that drops its oldest row after a few sinks every decode step would otherwise
// memmove every head's whole metadata each step (about 40 MB a step for 64 sequences of
// an 8-layer, 8-kv-head model at 2.5k rows a head).
#pragma once

#include <algorithm>
#include <cstddef>
#include <initializer_list>
#include <vector>

namespace kvgate::kv {

template <typename T>
class RowVector {
 public:
  using value_type = T;
  using iterator = T*;
  using const_iterator = const T*;
  using size_type = size_t;

  RowVector() = default;
  RowVector(size_t n, const T& value) : storage_(n, value) {}
  RowVector(std::initializer_list<T> values) : storage_(values) {}
  RowVector(const std::vector<T>& values) : storage_(values) {}  // NOLINT: a drop-in for std::vector
  RowVector(std::vector<T>&& values) : storage_(std::move(values)) {}  // NOLINT
  RowVector& operator=(const std::vector<T>& values) {
    storage_ = values;
    begin_ = 0;
    return *this;
  }
  RowVector& operator=(std::vector<T>&& values) {
    storage_ = std::move(values);
    begin_ = 0;
    return *this;
  }
  operator std::vector<T>() const { return std::vector<T>(begin(), end()); }  // NOLINT

  size_t size() const { return storage_.size() - begin_; }
  bool empty() const { return size() == 0; }
  T* data() { return storage_.data() + begin_; }
  const T* data() const { return storage_.data() + begin_; }
  T* begin() { return data(); }
  T* end() { return storage_.data() + storage_.size(); }
  const T* begin() const { return data(); }
  const T* end() const { return storage_.data() + storage_.size(); }
  T& operator[](size_t i) { return storage_[begin_ + i]; }
  const T& operator[](size_t i) const { return storage_[begin_ + i]; }
  T& front() { return (*this)[0]; }
  const T& front() const { return (*this)[0]; }
  T& back() { return storage_.back(); }
  const T& back() const { return storage_.back(); }

  void push_back(const T& value) { storage_.push_back(value); }
  void pop_back() { storage_.pop_back(); }
  void reserve(size_t n) { storage_.reserve(begin_ + n); }
  void resize(size_t n) { storage_.resize(begin_ + n); }
  void assign(size_t n, const T& value) {
    storage_.assign(n, value);
    begin_ = 0;
  }
  template <typename It>
  void assign(It first, It last) {
    storage_.assign(first, last);
    begin_ = 0;
  }
  void clear() {
    storage_.clear();
    begin_ = 0;
  }
  // Erases [first, last) (pointers into this vector), keeping the order of the rest.
  void erase(const T* first, const T* last) {
    const size_t from = static_cast<size_t>(first - storage_.data());
    const size_t to = static_cast<size_t>(last - storage_.data());
    storage_.erase(storage_.begin() + static_cast<std::ptrdiff_t>(from), storage_.begin() + static_cast<std::ptrdiff_t>(to));
  }
  // Drops the first n elements without moving the others; the storage is compacted once
  // the dropped prefix outgrows the live elements, so each element moves O(1) times.
  void erase_front(size_t n) {
    begin_ += std::min(n, size());
    if (begin_ > 64 && begin_ > size()) {
      storage_.erase(storage_.begin(), storage_.begin() + static_cast<std::ptrdiff_t>(begin_));
      begin_ = 0;
    }
  }

  friend bool operator==(const RowVector& a, const RowVector& b) {
    return std::equal(a.begin(), a.end(), b.begin(), b.end());
  }
  friend bool operator==(const RowVector& a, const std::vector<T>& b) {
    return std::equal(a.begin(), a.end(), b.begin(), b.end());
  }

 private:
  std::vector<T> storage_;
  size_t begin_ = 0;  // elements before it were erased from the front
};

}  // namespace kvgate::kv
