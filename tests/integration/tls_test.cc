// TLS on the public endpoint: certificates made with the `openssl` CLI at test time (a CA,
// a server certificate for 127.0.0.1 / localhost, a client certificate, and an unrelated
// CA). A client that trusts the CA gets through; plaintext and a client trusting another
// CA do not; with --tls-ca (mutual TLS) a client must also present a certificate.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "tests/integration/harness.h"
#include "tests/testing/paths.h"

namespace kvgate::integration {
namespace {

std::string Read(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::filesystem::path(testing::MakeTempDir("kvgate-tls"));
    const std::string d = dir_->string();
    // EC keys: fast to make. v3 extensions: a CA that may sign, leaves with SANs.
    const std::string key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    const std::string script = absl::StrCat(
        "set -e; cd '", d, "'\n",
        "for ca in ca other_ca; do\n"
        "  openssl req -x509 ", key, " -keyout $ca.key -out $ca.pem -days 2 -subj \"/CN=kvgate test $ca\" "
        "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign\n"
        "done\n"
        "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth,clientAuth\\n' > server.ext\n"
        "printf 'extendedKeyUsage=clientAuth\\n' > client.ext\n"
        "for leaf in server client; do\n"
        "  openssl req ", key, " -keyout $leaf.key -out $leaf.csr -subj \"/CN=kvgate-$leaf\"\n"
        "  openssl x509 -req -in $leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $leaf.pem -days 2 "
        "-extfile $leaf.ext\n"
        "done\n");
    const std::string command = absl::StrCat("bash -c '", EscapeSingleQuotes(script), "' > '", d, "/openssl.log' 2>&1");
    ok_ = std::system(command.c_str()) == 0;
  }

  static void TearDownTestSuite() {
    std::error_code ec;
    std::filesystem::remove_all(*dir_, ec);
    delete dir_;
    dir_ = nullptr;
  }

  static std::string EscapeSingleQuotes(const std::string& s) {
    std::string out;
    for (char ch : s) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
    return out;
  }

  void SetUp() override { ASSERT_TRUE(ok_) << "openssl failed:\n" << Read(*dir_ / "openssl.log"); }

  std::string File(const std::string& name) const { return (*dir_ / name).string(); }

  std::shared_ptr<grpc::ChannelCredentials> Trusting(const std::string& ca, bool client_cert) const {
    grpc::SslCredentialsOptions options;
    options.pem_root_certs = Read(*dir_ / ca);
    if (client_cert) {
      options.pem_cert_chain = Read(*dir_ / "client.pem");
      options.pem_private_key = Read(*dir_ / "client.key");
    }
    return grpc::SslCredentials(options);
  }

  // One short generation over `credentials`.
  grpc::Status TryGenerate(const Deployment& d, std::shared_ptr<grpc::ChannelCredentials> credentials) const {
    auto stub = v1::Inference::NewStub(Connect(d.address(), std::move(credentials)));
    Case c;
    c.prompt = StoryPrompt(Reference().tokenizer(), 20, 0);
    c.max_tokens = 4;
    return Generate(*stub, c.Request(), Within(absl::Seconds(5))).status;
  }

  static std::filesystem::path* dir_;
  static bool ok_;
};

std::filesystem::path* TlsTest::dir_ = nullptr;
bool TlsTest::ok_ = false;

TEST_F(TlsTest, ServerTlsServesClientsThatTrustItsCa) {
  DeploymentOptions options;
  options.extra_args = {"--tls-cert", File("server.pem"), "--tls-key", File("server.key")};
  options.credentials = Trusting("ca.pem", /*client_cert=*/false);
  absl::StatusOr<std::unique_ptr<Deployment>> deployment = Deployment::Start(options);
  ASSERT_TRUE(deployment.ok()) << deployment.status();
  Deployment& d = **deployment;

  grpc::Status trusted = TryGenerate(d, Trusting("ca.pem", false));
  EXPECT_TRUE(trusted.ok()) << ToString(trusted);
  grpc::Status plaintext = TryGenerate(d, grpc::InsecureChannelCredentials());
  EXPECT_EQ(plaintext.error_code(), grpc::StatusCode::UNAVAILABLE) << ToString(plaintext);
  grpc::Status wrong_ca = TryGenerate(d, Trusting("other_ca.pem", false));
  EXPECT_EQ(wrong_ca.error_code(), grpc::StatusCode::UNAVAILABLE) << ToString(wrong_ca);
}

TEST_F(TlsTest, MutualTlsAlsoRequiresAClientCertificate) {
  DeploymentOptions options;
  options.extra_args = {"--tls-cert", File("server.pem"), "--tls-key", File("server.key"), "--tls-ca", File("ca.pem")};
  options.credentials = Trusting("ca.pem", /*client_cert=*/true);
  absl::StatusOr<std::unique_ptr<Deployment>> deployment = Deployment::Start(options);
  ASSERT_TRUE(deployment.ok()) << deployment.status();
  Deployment& d = **deployment;

  grpc::Status mutual = TryGenerate(d, Trusting("ca.pem", true));
  EXPECT_TRUE(mutual.ok()) << ToString(mutual);
  grpc::Status no_client_cert = TryGenerate(d, Trusting("ca.pem", false));
  EXPECT_EQ(no_client_cert.error_code(), grpc::StatusCode::UNAVAILABLE) << ToString(no_client_cert);
  grpc::Status plaintext = TryGenerate(d, grpc::InsecureChannelCredentials());
  EXPECT_EQ(plaintext.error_code(), grpc::StatusCode::UNAVAILABLE) << ToString(plaintext);
  grpc::Status wrong_ca = TryGenerate(d, Trusting("other_ca.pem", true));
  EXPECT_EQ(wrong_ca.error_code(), grpc::StatusCode::UNAVAILABLE) << ToString(wrong_ca);
}

TEST_F(TlsTest, SplitDeploymentTalksMutualTlsBetweenComponents) {
  DeploymentOptions options;
  options.split = true;
  options.extra_args = {"--tls-cert", File("server.pem"), "--tls-key", File("server.key"), "--tls-ca", File("ca.pem")};
  options.credentials = Trusting("ca.pem", /*client_cert=*/true);
  absl::StatusOr<std::unique_ptr<Deployment>> deployment = Deployment::Start(options);
  ASSERT_TRUE(deployment.ok()) << deployment.status();
  grpc::Status mutual = TryGenerate(**deployment, Trusting("ca.pem", true));
  EXPECT_TRUE(mutual.ok()) << ToString(mutual) << "\n" << (*deployment)->Logs();
}

}  // namespace
}  // namespace kvgate::integration
